//! The per-host pipeline, and the engine that owns its state.
//!
//! For each frame: parse L2 (decapsulating VXLAN on the uplink), apply the
//! anti-spoofing checks of the sending vNIC, extract the flow key, then
//! - **flow cache** hit with the current policy epoch: update the connection and forward;
//! - otherwise the **slow path**: an existing connection (the reply direction,
//!   or a flow whose cache entry was evicted or imported) is reinstalled
//!   without classification if its verdict is current, re-validated if the
//!   policy changed since (and cut if now denied); a new flow is classified
//!   once, against the source vNIC's egress chain *and* the destination
//!   vNIC's ingress chain, then tracked and cached. A flow arriving from
//!   another host with the VXLAN-GBP policy-applied bit is trusted, not
//!   classified again.
//!
//! Each frame's decision is recorded in the caller's [`Results`]: a
//! [`crate::Disposition`] and the [`crate::Output`]s (ports, with the
//! encapsulation to apply), which [`crate::render()`] and its siblings turn into frames.
//!
//! This module owns the engine's state and the order of the stages; each
//! stage has its own module: `switching` (L2), `connection` (the flow
//! cache and connection step), `policy` (the decision and the one flow
//! key → policy flow conversion), `counters`, `export` (connection
//! state out and in). Rendering is the `render` module's.
//!
//! Across hosts, a segment travels in its VNI (a VLAN zone's VNI is its VLAN
//! id). The policy-applied bit is believed from any sender on the underlay, so
//! the underlay must be trusted (or authenticated, e.g. IPsec), as in every
//! VXLAN-GBP deployment. Frames from the uplink claiming a local vNIC's MAC
//! are dropped as spoofed.
//!
//! Hot-path notes: the tables are preallocated ([`crate::table`]) and the
//! caller's [`Results`] is reused, so a cache hit allocates nothing; policy
//! is swapped whole by [`Engine::update_policy`], which only bumps an epoch.

use core::net::{IpAddr, Ipv4Addr};
use std::collections::HashMap;
use std::sync::Arc;

use palisade_policy::model::Level;
use palisade_wire::ethernet::EtherType;
use palisade_wire::flow::{self, FlowInfo, Fragment, Segment};
use palisade_wire::ip::IpProtocol;
use palisade_wire::tcp;
use palisade_wire::virtio_net::{GsoKind, Offload};

use crate::announce::{self, Announcement};
use crate::conntrack::{Conntrack, FullPolicy, TcpSeg, Timeouts};
use crate::decision::{Disposition, L2, Processed, ReplySpec, Results, Underlay};
use crate::events::EndReason;
use crate::events::EventSink;
use crate::flow_table::CachedVerdict;
use crate::flow_table::{FlowHash, FlowTable};
use crate::lookup::ChainLookup;
use crate::port::{self, PortError, PortId, UPLINK, UplinkConfig, VnicPort};
use crate::probe::{ProbeKey, ProbeReturn};
use crate::service::{ServiceChains, ServicePort};
use crate::switch::{self, LastDestination, Location, MacTable};
use crate::verdict::{Counters, DropReason, InspectProfile, Tally};

mod connection;
mod counters;
mod export;
mod kernel;
mod policy;
mod steering;
mod switching;

pub use counters::RuleInfo;
pub use export::VnicExport;
use policy::RuleRefs;
pub use policy::policy_flow;
use switching::parse_l2;

pub use kernel::{KernelForwarded, KernelTcpMarks};

/// Engine sizing and behaviour.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Flow-cache capacity (directional flows).
    pub flow_capacity: usize,
    /// Connection-table capacity.
    pub conn_capacity: usize,
    /// MAC-table capacity.
    pub mac_capacity: usize,
    /// What a full connection table does.
    pub full_policy: FullPolicy,
    /// Connection timeouts.
    pub timeouts: Timeouts,
    /// The uplink's underlay configuration.
    pub uplink: UplinkConfig,
}

impl EngineConfig {
    /// Defaults sized for a host with `uplink`.
    pub fn new(uplink: UplinkConfig) -> Self {
        EngineConfig {
            flow_capacity: 65_536,
            conn_capacity: 32_768,
            mac_capacity: 4096,
            full_policy: FullPolicy::EvictIdle,
            timeouts: Timeouts::default(),
            uplink,
        }
    }
}

/// Frames looked up ahead of processing in [`Engine::process_batch`]: enough
/// to cover a memory access with the work of the frames before it, few
/// enough that the prefetched lines are still in L1 when they are used.
const LOOKAHEAD: usize = 16;

/// Flow-cache capacity from which [`Engine::process_batch`] looks ahead:
/// about where the cache (64 bytes a bucket, twice as many buckets as
/// flows) outgrows a core's L2 cache.
const LOOKAHEAD_MIN_CAPACITY: usize = 8192;

/// A frame's flow key and its flow-cache hash, computed ahead of processing.
#[derive(Debug, Clone, Copy)]
struct Hint {
    info: FlowInfo,
    hash: FlowHash,
}

/// How a frame arrived: when, on which port, and for the underlay socket from which tunnel endpoint.
#[derive(Debug, Clone, Copy)]
struct Arrival {
    now: u64,
    port: PortId,
    overlay: Option<Ipv4Addr>,
}

/// One packet on its way through the pipeline: what its stages share.
#[derive(Debug, Clone, Copy)]
struct Packet {
    /// When it arrived (the caller's clock).
    now: u64,
    /// The port it arrived on.
    in_port: PortId,
    /// For the underlay socket, the tunnel endpoint that sent it.
    overlay: Option<Ipv4Addr>,
    /// Its length: as received, or for a super-frame that of the packets
    /// it stands for together (each repeats the headers).
    len: usize,
    /// The packets it stands for: a super-frame's segments, else 1.
    packets: u64,
    /// A TCP super-frame: where its last segment starts, from its sequence number.
    last_offset: u32,
    /// Where its (inner) Ethernet frame lies, and its segment (set once parsed).
    l2: L2,
    /// The vNIC that sent it (`None` from the uplink).
    src_vnic: Option<PortId>,
    /// It came from another host with the VXLAN-GBP policy-applied bit.
    trusted: bool,
    /// It is the second leg of a routed flow (it comes back from a router
    /// appliance with a managed VM's source address): it was counted on its
    /// first leg.
    second_leg: bool,
    /// Its flow's inspection profile (set by the flow step).
    inspect: Option<InspectProfile>,
    /// It comes back from an appliance instance, on this side of it.
    service: Option<ServicePort>,
    /// A reset that ends its (steered) connection, left standing until the
    /// reset has been through the appliance
    /// ([`Engine::reset_goes_through_appliance`]).
    reset_pending: bool,
}

/// What a rejected packet's reply is built from ([`crate::render_reply`]):
/// `None` when the frame is not IP with addresses of one family.
fn reply_spec(frame: &[u8], l2: &L2) -> Option<ReplySpec> {
    let inner = frame.get(l2.eth..)?;
    let info = flow::extract(inner).ok().flatten()?;
    if info.key.src_addr().is_ipv4() != info.key.dst_addr().is_ipv4() {
        return None;
    }
    let tcp = if info.key.protocol == IpProtocol::TCP {
        tcp_seg(inner, &info)
    } else {
        None
    };
    Some(ReplySpec {
        key: info.key,
        l3_offset: usize::from(info.l3_offset),
        l4_offset: usize::from(info.l4_offset),
        tcp,
    })
}

/// The segment every connection is keyed in. Addresses are unique across the
/// inventory, so the datacenter is one routing domain: a connection is its L3
/// 5-tuple, whatever L2 segment a packet of it is on (the switch deals with
/// segments). The two legs of a routed flow (VM → router appliance → VM) are
/// therefore one connection, classified once.
pub const ROUTING_DOMAIN: Segment = Segment::UNTAGGED;

/// The engine of one host.
pub struct Engine {
    config: EngineConfig,
    lookup: Box<dyn ChainLookup + Send>,
    epoch: u64,
    ports: Vec<Option<VnicPort>>,
    macs: MacTable,
    flows: FlowTable,
    conns: Conntrack,
    counters: Counters,
    port_tallies: Vec<Tally>,
    /// Each port's last destination MAC and where it lived ([`MacTable::lookup_via`]).
    last_dst: Vec<LastDestination>,
    /// Drops by reason of the frames each port sent.
    port_drops: Vec<[u64; DropReason::COUNT]>,
    /// Announcements each vNIC's guest made (RARP, gratuitous ARP) and the
    /// last one's kind, by port (grown when one is made).
    announced: Vec<(u64, Option<announce::AnnounceKind>)>,
    /// vNIC ports whose VM the inventory places on another host
    /// ([`Engine::set_port_standby`]): a guest announcing itself on one
    /// arrived without its state, and the port is quiesced at once.
    standby: Vec<bool>,
    rule_index: HashMap<(Arc<str>, Level), u32, foldhash::fast::RandomState>,
    /// `rule_index` by the address of the rule id a verdict carries: the
    /// lookup hands out the same shared id for every flow a rule decides, so
    /// a new flow finds its counter without hashing the name. Each entry
    /// holds its id, so an address cannot be freed and reused for another
    /// rule while it names this one; bounded by [`RULES_BY_ADDRESS`].
    rules_by_address: HashMap<(usize, Level), (Arc<str>, u32), foldhash::fast::RandomState>,
    rules: Vec<RuleInfo>,
    /// The addresses of the local vNICs.
    local_ips: HashMap<IpAddr, PortId, foldhash::fast::RandomState>,
    /// `config.uplink`'s side of the underlay, as every call hands it to its [`Results`].
    underlay: Underlay,
    /// Inspection profile names by number less one ([`InspectProfile`]).
    inspect_names: Vec<Arc<str>>,
    /// Ports quiesced for live migration, by port index
    /// ([`Engine::set_port_quiesced`]), and whether any is.
    quiesced: Vec<bool>,
    any_quiesced: bool,
    /// The policy's service chains, resolved against the ports.
    services: ServiceChains,
    /// The key appliance health probes are tagged with ([`Engine::set_probe_key`]).
    probe_key: ProbeKey,
    /// Probes taken back since the caller last took them ([`Engine::take_probe_returns`]).
    probe_returns: Vec<ProbeReturn>,
}

impl core::fmt::Debug for Engine {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Engine")
            .field("epoch", &self.epoch)
            .field("ports", &self.ports.len())
            .field("flows", &self.flows.len())
            .field("conns", &self.conns.len())
            .finish_non_exhaustive()
    }
}

const MAX_PORTS: usize = 4096;

/// Entries of `Engine::rules_by_address` before it starts over.
const RULES_BY_ADDRESS: usize = 1 << 16;

impl Engine {
    /// An engine with only its uplink (port 0).
    pub fn new(config: EngineConfig, lookup: Box<dyn ChainLookup + Send>) -> Self {
        let underlay = Underlay::of(&config.uplink);
        let mut engine = Engine {
            flows: FlowTable::new(config.flow_capacity),
            conns: Conntrack::new(config.conn_capacity, 1, config.timeouts, config.full_policy),
            macs: MacTable::new(config.mac_capacity),
            config,
            lookup,
            epoch: 1,
            ports: vec![None],
            counters: Counters::default(),
            port_tallies: vec![Tally::default()],
            last_dst: vec![LastDestination::default()],
            port_drops: vec![[0; DropReason::COUNT]],
            announced: Vec::new(),
            standby: Vec::new(),
            rule_index: HashMap::default(),
            rules_by_address: HashMap::default(),
            rules: Vec::new(),
            local_ips: HashMap::default(),
            underlay,
            inspect_names: Vec::new(),
            quiesced: Vec::new(),
            any_quiesced: false,
            services: ServiceChains::default(),
            probe_key: ProbeKey::random(),
            probe_returns: Vec::new(),
        };
        engine.resolve_services();
        engine
    }

    /// Attach a vNIC; its MAC is bound in its segment.
    pub fn add_vnic(&mut self, vnic: VnicPort) -> Result<PortId, PortError> {
        if self.ports.len() >= MAX_PORTS {
            return Err(PortError::TooMany);
        }
        let id = PortId(self.ports.len() as u16);
        self.macs.bind(vnic.segment, vnic.mac, id);
        for ip in &vnic.ips {
            self.local_ips.entry(port::canonical_ip(*ip)).or_insert(id);
        }
        self.ports.push(Some(vnic));
        self.port_tallies.push(Tally::default());
        self.last_dst.push(LastDestination::default());
        self.port_drops.push([0; DropReason::COUNT]);
        self.conns.ensure_ports(self.ports.len());
        if !self.lookup.service_chains().is_empty() {
            self.resolve_services();
        }
        Ok(id)
    }

    /// The port of vNIC `name`.
    pub fn port_of(&self, name: &str) -> Option<PortId> {
        self.ports
            .iter()
            .position(|p| p.as_ref().is_some_and(|p| p.name == name))
            .map(|i| PortId(i as u16))
    }

    /// A vNIC port.
    pub fn vnic(&self, port: PortId) -> Option<&VnicPort> {
        self.ports.get(usize::from(port.0))?.as_ref()
    }

    /// Every vNIC port, in port order.
    pub fn vnic_ports(&self) -> impl Iterator<Item = (PortId, &VnicPort)> {
        self.ports
            .iter()
            .enumerate()
            .filter_map(|(i, p)| Some((PortId(i as u16), p.as_ref()?)))
    }

    /// The policy epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The policy version of the current lookup.
    pub fn policy_version(&self) -> u64 {
        self.lookup.version()
    }

    /// The connection table.
    pub fn conntrack(&self) -> &Conntrack {
        &self.conns
    }

    /// The flow cache.
    pub fn flow_table(&self) -> &FlowTable {
        &self.flows
    }

    /// Swap in a new policy. Cached flows are re-validated on their next
    /// packet; nothing else changes now.
    pub fn update_policy(&mut self, lookup: Box<dyn ChainLookup + Send>) {
        self.lookup = lookup;
        self.epoch += 1;
        self.resolve_services();
        // The old policy's ids go with it; its rules keep their counters by name.
        self.rules_by_address.clear();
        // Every connection is re-validated (and its profile numbered again)
        // before its next packet is handed on, so the numbering may start over.
        if self.inspect_names.len() >= InspectProfile::MAX / 2 {
            self.inspect_names.clear();
        }
    }

    /// Quiesce (`true`) or resume a port for live migration: while
    /// quiesced, frames switched towards it are dropped with
    /// [`DropReason::VnicMigrating`] before any connection step, so a peer
    /// still sending to a VM that has moved away opens nothing on the old
    /// host. (What the port itself receives is the caller's to discard: it
    /// never hands such frames in.) Returns `false` for an unknown port.
    pub fn set_port_quiesced(&mut self, port: PortId, quiesced: bool) -> bool {
        let i = usize::from(port.0);
        if i >= self.ports.len() {
            return false;
        }
        if self.quiesced.len() < self.ports.len() {
            self.quiesced.resize(self.ports.len(), false);
        }
        self.quiesced[i] = quiesced;
        self.any_quiesced = self.quiesced.iter().any(|&q| q);
        true
    }

    /// Whether `port` is quiesced ([`Engine::set_port_quiesced`]).
    pub fn is_quiesced(&self, port: PortId) -> bool {
        self.quiesced.get(usize::from(port.0)).copied().unwrap_or(false)
    }

    /// The name of inspection profile `id` (as the policy spells it).
    pub fn inspection_profile_name(&self, id: InspectProfile) -> Option<&str> {
        self.inspect_names.get(usize::from(id.get()) - 1).map(|n| &**n)
    }

    /// Inline inspection could not inspect a forwarded frame and its zone
    /// fails closed: the frame (`packets` packets), which the caller does not
    /// send, is counted as dropped for [`DropReason::Inspection`] instead of
    /// forwarded. Its flow is left as it is.
    pub fn inspection_discard(&mut self, port: PortId, packets: u64) {
        let reason = DropReason::Inspection;
        self.counters.forwarded = self.counters.forwarded.saturating_sub(packets);
        self.counters.drops[reason.index()] += packets;
        if let Some(d) = self.port_drops.get_mut(usize::from(port.0)) {
            d[reason.index()] += packets;
        }
    }

    /// Inline inspection's verdict on a forwarded frame's flow: drop it.
    /// The frame (which the caller does not send) is taken from the
    /// forwarded count to [`DropReason::Inspection`]'s, as `packets` packets
    /// of `len` bytes (a super-frame's segments); the connection `key`
    /// belongs to (either direction) ends with [`EndReason::Inspection`],
    /// and both directions' cache entries become that drop, so every later
    /// packet of the flow is dropped on the fast path, without inspection,
    /// until the entry is re-validated by a policy change or evicted (a
    /// connection it would then start again meets the inspector's verdict
    /// on the flow once more). Returns whether a connection was found.
    pub fn inspection_drop(
        &mut self,
        key: &flow::FlowKey,
        now: u64,
        port: PortId,
        packets: u64,
        sink: &mut dyn EventSink,
    ) -> bool {
        let reason = DropReason::Inspection;
        self.inspection_discard(port, packets);
        let mut key = *key;
        key.segment = ROUTING_DOMAIN;
        let found = self.conns.lookup(&key, now, sink, &mut self.counters);
        let (orig, rules) = match found.and_then(|(slot, _)| Some((slot, self.conns.get(slot)?))) {
            Some((slot, conn)) => {
                let (orig, rules) = (conn.key, conn.rules);
                self.cut(slot, EndReason::Inspection, now, sink);
                (orig, rules)
            }
            None => (key, [None; 2]),
        };
        for k in [orig, orig.reversed()] {
            let hash = self.flows.hash(&k);
            self.cache(k, hash, CachedVerdict::Drop(reason), None, rules);
        }
        found.is_some()
    }

    /// Remove up to `budget` expired connections.
    pub fn expire(&mut self, now: u64, budget: usize, sink: &mut dyn EventSink) -> usize {
        self.conns.expire(now, budget, sink, &mut self.counters)
    }

    /// One step of `sweep`'s pass ([`crate::Sweep`]): at most `scan` slots
    /// of the connection table (at least one, so a pass always ends),
    /// expired connections removed with their end events to `sink` (as
    /// [`Engine::expire`]), and, when the pass reports updates, an update
    /// event per live connection seen since its time to `updates`. An idle
    /// sweep does nothing.
    pub fn sweep_step(
        &mut self,
        sweep: &mut crate::Sweep,
        now: u64,
        scan: usize,
        sink: &mut dyn EventSink,
        updates: &mut dyn EventSink,
    ) -> crate::SweepStep {
        let Some(from) = sweep.next else {
            return crate::SweepStep {
                done: true,
                ..crate::SweepStep::default()
            };
        };
        let (next, expired) = self.conns.sweep(
            from,
            scan.max(1),
            now,
            sweep.updates_since,
            sink,
            updates,
            &mut self.counters,
        );
        let done = next >= self.conns.slab_len();
        sweep.next = if done { None } else { Some(next) };
        crate::SweepStep {
            scanned: next - from.min(next),
            expired,
            done,
        }
    }

    /// A vNIC's guest announced itself: counted, and told to `sink`; on a
    /// standby port the port is quiesced from this frame on (it is still
    /// switched, so the network learns where the guest is).
    fn announce(&mut self, a: Announcement, sink: &mut dyn EventSink) {
        let i = usize::from(a.port.0);
        if self.announced.len() <= i {
            self.announced.resize(i + 1, (0, None));
        }
        self.announced[i].0 += 1;
        self.announced[i].1 = Some(a.kind);
        if self.standby.get(i).copied().unwrap_or(false) {
            self.standby[i] = false;
            self.set_port_quiesced(a.port, true);
        }
        sink.announced(&a);
    }

    /// A frame from quiesced vNIC port `port` (dropped): if it is its
    /// guest announcing itself (RARP, or gratuitous ARP from the vNIC's own
    /// MAC and address), the announcement is still counted: a guest that
    /// left this host with its state (the port stays quiesced for
    /// stragglers) and came back through a migration made without the
    /// controller is seen, so the agent reports it and its state follows;
    /// otherwise it would stay dropped here unseen.
    fn announce_while_quiesced(&mut self, port: PortId, frame: &[u8], sink: &mut dyn EventSink) {
        let Some(v) = self.vnic(port) else { return };
        let Ok(l2) = parse_l2(frame, 0) else { return };
        if l2.src != v.mac || !matches!(l2.ethertype, EtherType::ARP | EtherType::RARP) {
            return;
        }
        let payload = frame.get(l2.payload..).unwrap_or(&[]);
        if l2.ethertype == EtherType::ARP && switch::check_arp(v, payload).is_err() {
            return;
        }
        if let Some((mac, kind)) = announce::classify(l2.ethertype, payload)
            && mac == v.mac
        {
            self.announce(Announcement { port, mac, kind }, sink);
        }
    }

    /// Mark a vNIC port standby (`true`): its VM runs on another host as
    /// far as this host knows, so a guest announcing itself on it
    /// ([`crate::announce`]) migrated here without its connections. The
    /// port is then quiesced by that very frame: what the guest sends and
    /// what is sent to it is dropped as [`DropReason::VnicMigrating`]
    /// (nothing is decided without the state) until the caller resumes it,
    /// when the state arrived or its wait ended. Returns `false` for an
    /// unknown port.
    pub fn set_port_standby(&mut self, port: PortId, standby: bool) -> bool {
        let i = usize::from(port.0);
        if self.vnic(port).is_none() {
            return false;
        }
        if self.standby.len() <= i {
            self.standby.resize(i + 1, false);
        }
        self.standby[i] = standby;
        true
    }

    /// Whether `port` is standby ([`Engine::set_port_standby`]).
    pub fn is_standby(&self, port: PortId) -> bool {
        self.standby.get(usize::from(port.0)).copied().unwrap_or(false)
    }

    /// How many times `port`'s guest announced itself (RARP or gratuitous
    /// ARP, see [`crate::announce`]), and the last one's kind: a caller
    /// that cannot take [`EventSink::announced`] compares counts.
    pub fn announcements(&self, port: PortId) -> (u64, Option<announce::AnnounceKind>) {
        self.announced.get(usize::from(port.0)).copied().unwrap_or((0, None))
    }

    /// Process one frame received on `port` at `now` (nanoseconds, caller's
    /// clock). `results` is cleared and then holds this frame's decision,
    /// which is returned paired with the frame (see [`crate::render()`]).
    #[inline]
    pub fn process<'a>(
        &mut self,
        now: u64,
        port: PortId,
        frame: &'a [u8],
        sink: &mut dyn EventSink,
        results: &'a mut Results,
    ) -> Processed<'a> {
        results.begin(self.underlay);
        let at = Arrival {
            now,
            port,
            overlay: None,
        };
        self.process_frame::<false>(at, frame, &Offload::NONE, None, sink, results);
        results.last(frame)
    }

    /// [`Engine::process`] for a frame with its offload state (from a port's
    /// virtio-net header). A TSO/GSO super-frame is decided as one unit, as
    /// the packets it stands for would be one by one: one flow lookup, its
    /// connection tracked over its whole sequence range, counted as its
    /// segments (packets, and their bytes with the headers each repeats),
    /// one verdict for all of it. A partial checksum stays partial: the
    /// engine reads no L4 checksum. The decision carries the offload state
    /// on to rendering ([`crate::render_offload`]). A frame whose offload
    /// request does not fit its packet is dropped as [`DropReason::BadOffload`].
    #[inline]
    pub fn process_offloaded<'a>(
        &mut self,
        now: u64,
        port: PortId,
        frame: &'a [u8],
        offload: Offload,
        sink: &mut dyn EventSink,
        results: &'a mut Results,
    ) -> Processed<'a> {
        results.begin(self.underlay);
        let at = Arrival {
            now,
            port,
            overlay: None,
        };
        self.process_frame::<true>(at, frame, &offload, None, sink, results);
        results.last(frame)
    }

    /// Process a batch of frames received on `port` at `now`. `results` is
    /// cleared and then holds one decision per frame, in order
    /// ([`Results::iter`] pairs them with `frames`); the caller keeps it
    /// across batches, so its memory is reused.
    ///
    /// The result is exactly that of calling [`Engine::process`] on each
    /// frame in turn; the difference is speed. With many flows the flow cache
    /// and the connection table are far bigger than the CPU caches, so every
    /// lookup would wait on memory. Here the frames of a vNIC are looked up
    /// in groups ahead of processing, VPP-style: keys are extracted and the
    /// cache buckets prefetched for the whole group, then the buckets are
    /// read and the connections they name prefetched, and only then is each
    /// frame processed, its key and hash reused, by which time its memory has
    /// arrived.
    pub fn process_batch<F: AsRef<[u8]>>(
        &mut self,
        now: u64,
        port: PortId,
        frames: &[F],
        sink: &mut dyn EventSink,
        results: &mut Results,
    ) {
        self.process_batch_offloaded(now, port, frames, &[], sink, results);
    }

    /// [`Engine::process_batch`] for frames with their offload state:
    /// `offloads[i]` is that of `frames[i]` (a frame without one is plain,
    /// [`Offload::NONE`]). Each frame is decided as
    /// [`Engine::process_offloaded`] decides it.
    pub fn process_batch_offloaded<F: AsRef<[u8]>>(
        &mut self,
        now: u64,
        port: PortId,
        frames: &[F],
        offloads: &[Offload],
        sink: &mut dyn EventSink,
        results: &mut Results,
    ) {
        results.begin(self.underlay);
        // A small flow cache sits in the CPU caches and looking ahead only
        // costs a second probe per frame (measured: 74 vs 82 ns at 1k
        // flows), so it starts where memory latency does: at a table whose
        // buckets outgrow the caches, however many flows it holds, since a
        // new flow lands on any bucket of it (new flows per second through
        // a table of 100k: 1.49-1.67 M with look-ahead from 8,192 flows
        // held, 1.61-1.88 M from that capacity).
        let lookahead = port != UPLINK && self.vnic(port).is_some() && self.flows.capacity() >= LOOKAHEAD_MIN_CAPACITY;
        for (g, group) in frames.chunks(LOOKAHEAD).enumerate() {
            let mut hints = [None; LOOKAHEAD];
            if lookahead {
                self.look_ahead(group, &mut hints);
                self.prefetch_conns(&hints);
            }
            for (i, (f, h)) in group.iter().zip(hints).enumerate() {
                let at = Arrival {
                    now,
                    port,
                    overlay: None,
                };
                if offloads.is_empty() {
                    self.process_frame::<false>(at, f.as_ref(), &Offload::NONE, h, sink, results);
                } else {
                    let offload = offloads.get(g * LOOKAHEAD + i).unwrap_or(&Offload::NONE);
                    self.process_frame::<true>(at, f.as_ref(), offload, h, sink, results);
                }
            }
        }
    }

    /// The first look-ahead stage of [`Engine::process_batch`]: each frame's
    /// hint, its cache bucket prefetched.
    fn look_ahead<F: AsRef<[u8]>>(&self, group: &[F], hints: &mut [Option<Hint>; LOOKAHEAD]) {
        for (h, f) in hints.iter_mut().zip(group) {
            *h = self.hint(f.as_ref());
        }
    }

    /// The second stage: read the cache buckets (loading by now) and
    /// prefetch the connections they name.
    fn prefetch_conns(&self, hints: &[Option<Hint>; LOOKAHEAD]) {
        for h in hints.iter().flatten() {
            if let Some(e) = self.flows.get_current(&h.info.key, h.hash, self.epoch)
                && let Some(slot) = e.conn
            {
                self.conns.prefetch(slot);
            }
        }
    }

    /// A vNIC frame's flow key and hash, computed ahead of processing (see
    /// [`Engine::process_batch`]), with its flow-cache bucket prefetched.
    /// Computed exactly as the pipeline would: a vNIC frame's IP packet
    /// starts right after its Ethernet header, so `extract` sees the same
    /// bytes.
    fn hint(&self, frame: &[u8]) -> Option<Hint> {
        let info = flow_info(frame).ok()?;
        let hash = self.flows.hash(&info.key);
        self.flows.prefetch(hash);
        Some(Hint { info, hash })
    }

    /// Process a VXLAN packet that arrived on the underlay UDP socket from
    /// tunnel endpoint `remote`: `payload` is the UDP payload (the VXLAN
    /// header, then the inner Ethernet frame). It is the uplink's traffic
    /// without the outer headers the kernel already removed; outputs towards
    /// other hosts are rendered for the same socket by
    /// [`crate::render_overlay`]. `results` as for [`Engine::process`].
    #[inline]
    pub fn process_overlay<'a>(
        &mut self,
        now: u64,
        remote: Ipv4Addr,
        payload: &'a [u8],
        sink: &mut dyn EventSink,
        results: &'a mut Results,
    ) -> Processed<'a> {
        self.process_overlay_offloaded(now, remote, payload, Offload::NONE, sink, results)
    }

    /// [`Engine::process_overlay`] for a payload with offload state (a
    /// super-frame merged from the underlay's GRO batches): its offsets
    /// count from the start of `payload` (the VXLAN header). Decided as
    /// [`Engine::process_offloaded`] decides a frame.
    #[inline]
    pub fn process_overlay_offloaded<'a>(
        &mut self,
        now: u64,
        remote: Ipv4Addr,
        payload: &'a [u8],
        offload: Offload,
        sink: &mut dyn EventSink,
        results: &'a mut Results,
    ) -> Processed<'a> {
        results.begin(self.underlay);
        let at = Arrival {
            now,
            port: UPLINK,
            overlay: Some(remote),
        };
        self.process_frame::<true>(at, payload, &offload, None, sink, results);
        results.last(payload)
    }

    /// Run one frame through the pipeline and record its decision in `results`.
    ///
    /// Compiled twice: `OFFLOADED` false for plain frames (`offload` is then
    /// [`Offload::NONE`] and ignored), so that the plain path, the common
    /// one, neither loads an offload state nor tests it (passed in memory,
    /// just written by the caller, the offload state's load stalled on
    /// store forwarding: 1k flows one frame at a time, +5 ns a frame).
    #[inline(never)]
    fn process_frame<const OFFLOADED: bool>(
        &mut self,
        at: Arrival,
        frame: &[u8],
        offload: &Offload,
        hint: Option<Hint>,
        sink: &mut dyn EventSink,
        results: &mut Results,
    ) {
        let start = results.outputs_start();
        let mut pkt = Packet {
            now: at.now,
            in_port: at.port,
            overlay: at.overlay,
            len: frame.len(),
            packets: 1,
            last_offset: 0,
            l2: L2::default(),
            src_vnic: None,
            trusted: false,
            second_leg: false,
            inspect: None,
            service: None,
            reset_pending: false,
        };
        let mut reply = None;
        let result = self.pipeline::<OFFLOADED>(&mut pkt, frame, offload, hint, sink, results);
        // Counted once the pipeline knows how many packets the frame stands for.
        let packets = pkt.packets;
        self.counters.packets += packets;
        if let Some(t) = self.port_tallies.get_mut(usize::from(at.port.0)) {
            t.add_n(packets, pkt.len as u64);
        }
        let disposition = match result {
            Ok(()) if results.outputs_since(start) > 0 => {
                self.counters.forwarded += packets;
                Disposition::Forward
            }
            Ok(()) => {
                self.counters.drops[DropReason::NoRoute.index()] += packets;
                Disposition::Drop(DropReason::NoRoute)
            }
            Err(r) => {
                results.discard_outputs(start);
                self.counters.drops[r.index()] += packets;
                if let Some(d) = self.port_drops.get_mut(usize::from(at.port.0)) {
                    d[r.index()] += packets;
                }
                if r == DropReason::PolicyReject {
                    reply = reply_spec(frame, &pkt.l2);
                }
                Disposition::Drop(r)
            }
        };
        let offload = if OFFLOADED { *offload } else { Offload::NONE };
        // A routed flow's second leg (back from a router appliance) was
        // handed on for inspection on its first: once is enough.
        let inspect = match disposition {
            Disposition::Forward if !pkt.second_leg => pkt.inspect,
            _ => None,
        };
        results.record(disposition, pkt.l2, frame.len(), offload, start, reply, inspect);
    }

    /// The stages of [`Engine::process_frame`] (`OFFLOADED` and `offload` as there).
    #[inline(always)]
    fn pipeline<const OFFLOADED: bool>(
        &mut self,
        pkt: &mut Packet,
        frame: &[u8],
        offload: &Offload,
        hint: Option<Hint>,
        sink: &mut dyn EventSink,
        out: &mut Results,
    ) -> Result<(), DropReason> {
        let in_port = pkt.in_port;
        if in_port == UPLINK
            && self.services.any_external()
            && let Some(back) = self.back_from_external_appliance(frame, pkt.overlay)
        {
            // Back over the underlay from an external appliance: as a frame
            // back on an appliance VM's port, it carries the flow's
            // addresses (MACs of this host's vNICs among them), so it is
            // neither checked for spoofing nor learnt from; it is checked
            // against the steered flows instead ([`Engine::check_return`]).
            let (role, l2) = back?;
            if let Some(probe) = frame.get(l2.eth..).and_then(crate::probe::parse) {
                return Err(self.probe_back(role, &probe));
            }
            pkt.l2 = l2;
            pkt.service = Some(role);
        } else if in_port == UPLINK {
            let (l2, gbp, from) = match pkt.overlay {
                Some(remote) => self.vxlan_l2(frame, 0, remote)?,
                None => self.uplink_l2(frame)?,
            };
            // A local vNIC's MAC cannot arrive from outside: someone is impersonating it.
            if let Some(Location::Port(p)) = self.macs.lookup(l2.segment, l2.src)
                && p != UPLINK
            {
                return Err(DropReason::SpoofedMac);
            }
            pkt.l2 = l2;
            pkt.trusted = gbp;
            let at = from.map_or(Location::Port(UPLINK), Location::Remote);
            self.macs.learn(l2.segment, l2.src, at);
        } else {
            let vnic = self.vnic(in_port).ok_or(DropReason::UnknownPort)?;
            // A port the engine quiesced itself (an arrival on a standby
            // port): the worker does not know to discard its frames.
            if self.any_quiesced && self.is_quiesced(in_port) {
                self.announce_while_quiesced(in_port, frame, sink);
                return Err(DropReason::VnicMigrating);
            }
            let role = self.services.role(in_port);
            if let Some(role) = role
                && let Some(probe) = crate::probe::parse(frame)
            {
                // A health probe back through the appliance: consumed here.
                return Err(self.probe_back(role, &probe));
            }
            let mut l2 = parse_l2(frame, 0)?;
            if let Some(role) = role {
                // Back from an appliance: the frame carries the flow's
                // addresses, not the appliance VM's. It is checked against
                // the steered flows instead ([`Engine::check_return`]), and
                // switched in the segment it was steered from.
                l2.segment = vnic.segment;
                pkt.l2 = l2;
                pkt.service = Some(role);
            } else {
                if l2.src != vnic.mac {
                    return Err(DropReason::SpoofedMac);
                }
                if l2.segment != Segment::UNTAGGED && l2.segment != vnic.segment {
                    return Err(DropReason::VlanMismatch);
                }
                l2.segment = vnic.segment;
                pkt.l2 = l2;
                pkt.src_vnic = Some(in_port);
            }
        }
        let l2 = pkt.l2;
        let src_vnic = pkt.src_vnic;
        let trusted = pkt.trusted;
        let payload = frame.get(l2.payload..).unwrap_or(&[]);
        if OFFLOADED
            && let Some(c) = offload.csum
            && usize::from(c.start) < l2.payload
        {
            // Rendering moves the L2 headers: a checksum must start past them.
            return Err(DropReason::BadOffload);
        }
        match l2.ethertype {
            EtherType::ARP if OFFLOADED && offload.is_gso() => return Err(DropReason::BadOffload),
            // Only the steered flows' packets come back from an appliance.
            _ if pkt.service.is_some() && !matches!(l2.ethertype, EtherType::IPV4 | EtherType::IPV6) => {
                return Err(DropReason::ApplianceNotSteered);
            }
            EtherType::ARP => {
                if let Some(v) = src_vnic.and_then(|p| self.vnic(p)) {
                    switch::check_arp(v, payload)?;
                    // Checked: the sender is the vNIC's own MAC and address.
                    if let Some((mac, kind)) = announce::classify(l2.ethertype, payload) {
                        self.announce(
                            Announcement {
                                port: in_port,
                                mac,
                                kind,
                            },
                            sink,
                        );
                    }
                }
                let to = self.l2_destination(pkt)?;
                self.push_outputs(to, pkt, false, None, out);
                return Ok(());
            }
            // QEMU's announce after a migration, from the guest's vNIC: switched
            // like ARP (broadcast: switches learn the MAC's new port), and
            // reported. Any other RARP stays unsupported.
            EtherType::RARP if OFFLOADED && offload.is_gso() => return Err(DropReason::BadOffload),
            EtherType::RARP if src_vnic.is_some() => {
                let Some((mac, kind)) = announce::classify(l2.ethertype, payload) else {
                    return Err(DropReason::UnsupportedEthertype);
                };
                if src_vnic.and_then(|p| self.vnic(p)).is_none_or(|v| v.mac != mac) {
                    return Err(DropReason::SpoofedArp);
                }
                self.announce(
                    Announcement {
                        port: in_port,
                        mac,
                        kind,
                    },
                    sink,
                );
                let to = self.l2_destination(pkt)?;
                self.push_outputs(to, pkt, false, None, out);
                return Ok(());
            }
            EtherType::IPV4 | EtherType::IPV6 => {}
            _ => return Err(DropReason::UnsupportedEthertype),
        }
        // `eth` is where the (inner) frame starts: in bounds, it was parsed.
        let inner = &frame[l2.eth..];
        // A hint is only made for vNIC frames, whose `inner` is the whole frame.
        let (info, hash) = match hint {
            Some(h) => (h.info, Some(h.hash)),
            None => (flow_info(inner)?, None),
        };
        if info.fragment == Fragment::NonFirst {
            return Err(DropReason::Fragment);
        }
        if OFFLOADED && let Some(gso) = offload.gso {
            let shape = gso_shape(inner, &info, gso.kind, gso.size).ok_or(DropReason::BadOffload)?;
            // Every segment repeats the bytes up to the payload, the outer ones too.
            let repeated = l2.eth + shape.header_len;
            pkt.packets = shape.segments;
            pkt.len = frame.len() + (shape.segments as usize - 1) * repeated;
            pkt.last_offset = shape.last_offset;
        }
        let key = &info.key;
        let l4 = inner.get(usize::from(info.l4_offset)..).unwrap_or(&[]);
        let is_v6_icmp = key.protocol == IpProtocol::ICMPV6;
        // A packet seen a second time on this host (a routed flow's leg back
        // from a router) was counted the first time: through an appliance
        // port with a managed VM's source address, or from the uplink with a
        // local VM's source address (the router is on another host).
        pkt.second_leg = match src_vnic.and_then(|p| self.vnic(p)) {
            Some(v) => v.any_source && self.lookup.vnic_of(key.src_addr()).is_some(),
            // Back from an appliance: it was counted on its way in.
            None if pkt.service.is_some() => true,
            None => self.local_port_of(key.src_addr()).is_some(),
        };
        if let Some(v) = src_vnic.and_then(|p| self.vnic(p)) {
            // The common case, a VM sending from its own address, is
            // settled on the key's raw bytes; the rest (DHCP, link-local ND,
            // spoofing) takes the full check.
            if !v.any_source && !v.owns_mapped(&key.src) {
                switch::check_ip_source(v, key.src_addr(), key.protocol.0, key.dst_port)?;
            }
            if is_v6_icmp {
                switch::check_icmpv6(v, l4)?;
            }
        }
        if trusted {
            self.counters.trusted += 1;
        }
        if pkt.service.is_some() {
            return self.returning(pkt, &info, hash, inner, sink, out);
        }
        if let Some((ty, _)) = info.icmp {
            // Neighbour discovery and MLD are switch infrastructure, like ARP.
            if is_v6_icmp && (130..=143).contains(&ty) {
                let to = self.l2_destination(pkt)?;
                self.push_outputs(to, pkt, false, Some(key), out);
                return Ok(());
            }
            if flow::is_icmp_error(is_v6_icmp, ty) {
                let to = self.l2_destination(pkt)?;
                if !trusted {
                    self.icmp_error(pkt, &info, hash, l4, sink)?;
                }
                self.push_outputs(to, pkt, true, Some(key), out);
                return Ok(());
            }
        }
        // Where it goes is settled first: a frame with nowhere to go (back
        // out of its own port) must not open a connection or take a vNIC's
        // share of the table, as a connection is only confirmed by a packet
        // that leaves (netfilter confirms at the last hook, too).
        let to = self.l2_destination(pkt)?;
        if self.services.any() {
            self.not_to_appliance(to)?;
            let conn = self.decide(pkt, &info, hash, inner, sink)?;
            let next = match conn {
                Some((slot, reply)) => {
                    let steered = self.steer(pkt, slot, reply, to);
                    if pkt.reset_pending && !matches!(steered, Ok(steering::Next::Appliance(_))) {
                        // Its reset goes straight on (or nowhere): it ends here.
                        self.cut(slot, EndReason::Reset, pkt.now, sink);
                    }
                    steered?
                }
                None => steering::Next::Deliver(to),
            };
            self.push_next(next, pkt, key, out);
            return Ok(());
        }
        self.decide(pkt, &info, hash, inner, sink)?;
        self.push_outputs(to, pkt, true, Some(key), out);
        Ok(())
    }
}

/// The flow key and facts of the IP packet in an (inner) Ethernet frame, in
/// the routing domain; the common case is read at fixed offsets.
#[inline(always)]
fn flow_info(frame: &[u8]) -> Result<FlowInfo, DropReason> {
    let mut info = match flow::extract_quick(frame) {
        Some(info) => info,
        None => flow::extract(frame).ok().flatten().ok_or(DropReason::Malformed)?,
    };
    info.key.segment = ROUTING_DOMAIN;
    Ok(info)
}

fn canonical(ip: IpAddr) -> IpAddr {
    port::canonical_ip(ip)
}

/// How a super-frame divides into the packets it stands for.
#[derive(Debug, Clone, Copy)]
struct GsoShape {
    /// Bytes of the (inner) frame up to its payload, which every segment repeats.
    header_len: usize,
    /// How many packets it stands for.
    segments: u64,
    /// Where the last segment's payload starts in the payload.
    last_offset: u32,
}

/// The shape of a super-frame of `kind` with `size`-byte segments (`frame`
/// starts at its Ethernet header), as the segmentation that sends it (the
/// kernel's, or `palisade_io::gso::segment`) will cut it; `None` if it
/// cannot be cut: a kind for another protocol, UFO, a fragment, bytes past
/// the IP datagram, no payload, or TCP flags that cannot be spread over
/// segments (SYN, RST, URG).
fn gso_shape(frame: &[u8], info: &FlowInfo, kind: GsoKind, size: u16) -> Option<GsoShape> {
    let v6 = info.key.src_addr().is_ipv6();
    let tcp = info.key.protocol == IpProtocol::TCP;
    let fits = match kind {
        GsoKind::TcpV4 => tcp && !v6,
        GsoKind::TcpV6 => tcp && v6,
        GsoKind::UdpL4 => info.key.protocol == IpProtocol::UDP,
        GsoKind::Ufo => false,
    };
    if !fits || size == 0 || info.fragment != Fragment::None {
        return None;
    }
    let l3 = usize::from(info.l3_offset);
    let l4 = usize::from(info.l4_offset);
    let ip = frame.get(l3..)?;
    let ip_end = match ip.first()? >> 4 {
        4 => l3 + usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?])),
        _ => l3 + 40 + usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?])),
    };
    if ip_end != frame.len() {
        return None;
    }
    let l4_len = if tcp {
        let t = tcp::Packet::new_checked(frame.get(l4..)?).ok()?;
        let f = t.flags();
        if f.contains(tcp::TcpFlags::SYN) || f.contains(tcp::TcpFlags::RST) || f.contains(tcp::TcpFlags::URG) {
            return None;
        }
        t.header_len()
    } else {
        8
    };
    let header_len = l4 + l4_len;
    let payload = frame.len().checked_sub(header_len).filter(|&p| p > 0)?;
    let size = usize::from(size);
    let segments = payload.div_ceil(size);
    Some(GsoShape {
        header_len,
        segments: segments as u64,
        last_offset: ((segments - 1) * size) as u32,
    })
}

/// The TCP facts of the segment `info` describes (`frame` starts at its Ethernet header).
pub(crate) fn tcp_seg(frame: &[u8], info: &FlowInfo) -> Option<TcpSeg> {
    let l3 = usize::from(info.l3_offset);
    let l4 = usize::from(info.l4_offset);
    let ip = frame.get(l3..)?;
    let ip_end = match ip.first()? >> 4 {
        4 => l3 + usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?])),
        _ => l3 + 40 + usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?])),
    };
    let t = tcp::Packet::new_checked(frame.get(l4..ip_end)?).ok()?;
    let len = (ip_end - l4).checked_sub(t.header_len())? as u32;
    let mut seg = TcpSeg {
        seq: t.seq_number(),
        ack: t.ack_number(),
        win: t.window_len(),
        flags: t.flags(),
        len,
        ..TcpSeg::default()
    };
    seg.read_options(t.options());
    Some(seg)
}

//! The inspection engine: one call per packet, a typed outcome back.
//!
//! [`Inspector::inspect`] takes a flow's [`FlowState`], one of its packets
//! and the current time, and returns an [`Outcome`] (pass, alert, drop or
//! reject), appending the alerts it raised to a vector the caller owns and
//! reuses. It does no I/O, reads no clock and takes no lock (the stream
//! memory budget is an atomic counter, touched once per 64 KiB), so the datapath can call it from
//! its workers and the offline replay can call it from a capture, with the
//! same results.
//!
//! Per packet, in order:
//! 1. A flow already passed or dropped is not inspected again.
//! 2. TCP packets go through reassembly. The application-layer parser is
//!    fed each direction's data once acknowledged (IDS mode) or as it
//!    arrives in order (IPS mode, or `inline_stream`).
//! 3. Signatures are evaluated in the ruleset's order: IP-only ones on the
//!    first packet of each direction; packet and payload ones on the packet
//!    (its payload, when it was not taken into a stream) and on the stream
//!    data now ready in the packet's direction (in IDS mode: what the peer
//!    acknowledged; inline: what just arrived in order); transaction ones on
//!    every transaction whose buffers changed. A payload or transaction
//!    signature is evaluated only if its fast pattern was found, or it has
//!    none.
//! 4. Finally, as Suricata does: a matching pass rule discards every other
//!    match of the packet (and, if IP-only, ends inspection of the flow);
//!    thresholds and detection filters decide which matches alert; `drop`
//!    (IPS mode) drops the packet and the flow, `reject` answers with a
//!    reset or unreachable.

use core::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::LoadError;
use crate::app::{AppRecord, BufState, Detected, TxView};
use crate::flow::{DetectState, Direction, FlowState, FlowVerdict, ProfileId};
use crate::matcher::{DEFAULT_BUDGET, Program};
use crate::packet::{Packet, Transport, proto};
use crate::prefilter::{Candidates, ScanScratch, SigId};
use crate::rules::{Action, AppProto, Buffer, PacketCheck, Protocol};
use crate::ruleset::{Detector, ProfileSpec, ProtoClass, RuleSet};
use crate::signature::{FlowbitOp, FlowbitTest, SigKind, Signature};
use crate::stream::{LocalBudget, MemoryBudget, StreamCounters, StreamLimits};
use crate::tcp::{TcpConfig, TcpState};
use crate::threshold::{HostThresholds, judge};

/// IDS or IPS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Detect only: `drop` rules alert.
    #[default]
    Ids,
    /// Inline: `drop` rules drop, stream data is inspected as it arrives.
    Ips,
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// IDS or IPS.
    pub mode: Mode,
    /// Inspect TCP data as it arrives, not once acknowledged (always on in IPS mode).
    pub inline_stream: bool,
    /// Take up TCP connections first seen after their handshake.
    pub midstream: bool,
    /// Per-direction reassembly limits.
    pub stream: StreamLimits,
    /// Stream bytes all flows of this inspector may hold together.
    pub stream_memory: usize,
    /// Alerts one packet raises at most (more are counted, not returned).
    pub max_alerts_per_packet: usize,
    /// Host- and rule-tracked threshold windows kept at most.
    pub threshold_capacity: usize,
    /// Evaluation steps one buffer may cost (see [`crate::matcher`]).
    pub inspection_budget: u32,
    /// Produce a record of each application-layer transaction ([`Inspector::app_logs`]).
    pub app_logs: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: Mode::Ids,
            inline_stream: false,
            midstream: false,
            stream: StreamLimits::default(),
            stream_memory: 256 << 20,
            max_alerts_per_packet: 15,
            threshold_capacity: 65536,
            inspection_budget: DEFAULT_BUDGET,
            app_logs: false,
        }
    }
}

/// What the alert's record says the action was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertAction {
    /// The packet went on.
    Allowed,
    /// The packet was dropped or rejected.
    Blocked,
}

/// One alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alert {
    /// The signature.
    pub sig: SigId,
    /// Direction of the data that matched (orients the alert's addresses).
    pub direction: Direction,
    /// Allowed or blocked.
    pub action: AlertAction,
    /// The transaction it was raised on, for application-layer signatures.
    pub tx: Option<(AppProto, u64)>,
    /// Raised on reassembled stream data rather than on a packet.
    pub stream: bool,
}

/// Why a packet is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// A drop or reject rule matched this packet.
    Rules(SigId),
    /// An earlier packet of the flow was dropped.
    FlowDrop,
}

/// The engine's verdict on one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Outcome {
    /// Forward; nothing raised.
    Pass,
    /// Forward; alerts were appended.
    Alert,
    /// Drop the packet (IPS mode).
    Drop(DropReason),
    /// Drop the packet and answer with a TCP reset (TCP) or an ICMP
    /// destination unreachable (other protocols).
    Reject(DropReason),
}

/// Engine counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets inspected (including those of decided flows).
    pub packets: u64,
    /// Packets of flows already passed, not inspected.
    pub passed_flow_packets: u64,
    /// Packets of flows already dropped.
    pub dropped_flow_packets: u64,
    /// Alerts raised.
    pub alerts: u64,
    /// Alerts over the per-packet limit, not returned.
    pub alerts_discarded: u64,
    /// Matches a threshold, detection filter or `threshold.config` suppression kept from alerting.
    pub alerts_suppressed: u64,
    /// Packets dropped by a rule.
    pub drops: u64,
    /// Packets rejected by a rule.
    pub rejects: u64,
    /// Evaluations that ran out of steps (no match assumed).
    pub budget_exhausted: u64,
    /// Threshold windows judged without history (table full).
    pub threshold_table_full: u64,
    /// Reassembly counters.
    pub stream: StreamCounters,
    /// Segments not reassembled (beyond depth, or refused): inspected as packets.
    pub stream_fallback: u64,
    /// Application-layer protocol detections.
    pub app_detected: u64,
    /// Prefilter scans that failed (all of that prefilter's signatures were evaluated instead).
    pub prefilter_failures: u64,
    /// Flows whose detection state was reset because the ruleset changed.
    pub ruleset_changes: u64,
    /// Flows that named a profile this inspector does not have (given its first).
    pub unknown_profile: u64,
    /// Flows taken over from another inspector (live migration: [`crate::persist`]).
    pub flows_imported: u64,
    /// Of them, flows whose application-layer or reassembly state could not
    /// be carried and was resumed as a mid-stream pick-up.
    pub imported_midstream: u64,
    /// Flowbits and signatures imported flows named that these rules lack (that state was dropped).
    pub imported_unknown_refs: u64,
}

/// One piece of data to run payload signatures on.
#[derive(Debug, Clone, Copy)]
struct Unit<'a> {
    data: &'a [u8],
    origin: usize,
    stream: bool,
}

/// What a signature's evaluation on a packet needs to know besides the signature.
#[derive(Debug, Clone, Copy)]
struct Ctx<'p> {
    proto: u8,
    src: IpAddr,
    dst: IpAddr,
    sp: u16,
    dp: u16,
    has_ports: bool,
    direction: Direction,
    established: bool,
    app: Option<AppProto>,
    packet: Option<&'p Packet<'p>>,
}

/// One match, before thresholds and actions.
#[derive(Debug, Clone, Copy)]
struct Match {
    sig: SigId,
    direction: Direction,
    tx: Option<(AppProto, u64)>,
    stream: bool,
    src: IpAddr,
    dst: IpAddr,
}

/// The signature engine for one worker (or one offline run).
pub struct Inspector {
    rules: Arc<RuleSet>,
    detectors: Arc<[Detector]>,
    config: Config,
    budget: LocalBudget,
    hosts: HostThresholds,
    counters: Counters,
    candidates: Candidates,
    scan: ScanScratch,
    matches: Vec<Match>,
    app_logs: Vec<AppRecord>,
}

impl core::fmt::Debug for Inspector {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Inspector")
            .field("signatures", &self.rules.len())
            .field(
                "profiles",
                &self.detectors.iter().map(|d| d.spec.name.as_str()).collect::<Vec<_>>(),
            )
            .field("counters", &self.counters)
            .finish()
    }
}

impl Inspector {
    /// An inspector over `rules` with the given profiles (their order gives
    /// the [`ProfileId`]s) and its own stream memory budget.
    pub fn new(rules: Arc<RuleSet>, profiles: Vec<ProfileSpec>, config: Config) -> Result<Inspector, LoadError> {
        let budget = MemoryBudget::new(config.stream_memory);
        Self::with_budget(rules, profiles, config, budget)
    }

    /// As [`Inspector::new`], charging stream memory to a budget shared with
    /// other inspectors (the workers of one host).
    pub fn with_budget(
        rules: Arc<RuleSet>,
        profiles: Vec<ProfileSpec>,
        config: Config,
        budget: Arc<MemoryBudget>,
    ) -> Result<Inspector, LoadError> {
        let detectors = Self::compile(&rules, profiles)?;
        Ok(Self::shared(rules, detectors, config, budget))
    }

    /// Compiles profiles once, for several inspectors (one per worker) to share.
    pub fn compile(rules: &RuleSet, profiles: Vec<ProfileSpec>) -> Result<Arc<[Detector]>, LoadError> {
        Ok(profiles
            .into_iter()
            .map(|p| Detector::build(rules, p))
            .collect::<Result<Vec<_>, _>>()?
            .into())
    }

    /// An inspector using compiled profiles shared with others; it gets its
    /// own scan scratch, candidates and host-threshold table.
    pub fn shared(
        rules: Arc<RuleSet>,
        detectors: Arc<[Detector]>,
        config: Config,
        budget: Arc<MemoryBudget>,
    ) -> Inspector {
        let mut scan = ScanScratch::default();
        for d in detectors.iter() {
            d.prefilters().for_each(|p| scan.fit(p));
        }
        Inspector {
            hosts: HostThresholds::new(config.threshold_capacity),
            candidates: Candidates::default(),
            scan,
            matches: Vec::new(),
            app_logs: Vec::new(),
            rules,
            detectors,
            config,
            budget: LocalBudget::new(budget),
            counters: Counters::default(),
        }
    }

    /// The compiled profiles (to share with another inspector).
    pub fn detectors(&self) -> &Arc<[Detector]> {
        &self.detectors
    }

    /// The profile of that name.
    pub fn profile(&self, name: &str) -> Option<ProfileId> {
        self.detectors
            .iter()
            .position(|d| d.spec.name == name)
            .map(|i| ProfileId(i as u16))
    }

    /// A compiled profile.
    pub fn detector(&self, id: ProfileId) -> &Detector {
        &self.detectors[usize::from(id.0)]
    }

    /// The ruleset.
    pub fn rules(&self) -> &Arc<RuleSet> {
        &self.rules
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Counters so far.
    pub fn counters(&self) -> Counters {
        let mut c = self.counters;
        c.threshold_table_full = self.hosts.full_misses;
        c.prefilter_failures = self.scan.failures;
        c
    }

    /// The stream memory budget (shared with the inspectors given the same one).
    pub fn memory_budget(&self) -> &Arc<MemoryBudget> {
        self.budget.shared()
    }

    /// Records of the application-layer transactions finished since the
    /// caller last emptied this vector (with `Config::app_logs`).
    pub fn app_logs(&mut self) -> &mut Vec<AppRecord> {
        &mut self.app_logs
    }

    /// Stream bytes the flows of this inspector hold.
    pub fn stream_memory_in_use(&self) -> usize {
        self.budget.in_use()
    }

    /// What importing a flow's carried state touches: the settings, the
    /// stream budget it is charged to, the counters ([`crate::persist`]).
    pub(crate) fn persist_parts(&mut self) -> (&Config, &mut LocalBudget, &mut Counters) {
        (&self.config, &mut self.budget, &mut self.counters)
    }

    fn inline(&self) -> bool {
        self.config.inline_stream || self.config.mode == Mode::Ips
    }

    /// Inspects one packet of `flow` at time `now`, appending alerts to `alerts`.
    pub fn inspect(
        &mut self,
        flow: &mut FlowState,
        pkt: &Packet<'_>,
        now: Duration,
        alerts: &mut Vec<Alert>,
    ) -> Outcome {
        self.counters.packets += 1;
        let Some(mut dir) = flow.direction(pkt) else {
            return self.related(flow, pkt, now, alerts);
        };
        match flow.verdict {
            FlowVerdict::Pass => {
                self.counters.passed_flow_packets += 1;
                return Outcome::Pass;
            }
            FlowVerdict::Drop => {
                self.counters.dropped_flow_packets += 1;
                return Outcome::Drop(DropReason::FlowDrop);
            }
            FlowVerdict::Inspect => {}
        }
        self.adopt(flow);
        let first_in_dir = !flow.seen[dir.index()];
        flow.seen[dir.index()] = true;
        flow.counts.packets[dir.index()] += 1;
        flow.counts.bytes[dir.index()] += pkt.ip_len as u64;
        let inline = self.inline();
        let lookbehind = self.rules.lookbehind();

        // Reassembly and the application layer.
        // Without tracking this packet (a wrong TCP checksum), the session's state decides.
        let mut established = match flow.tcp.as_ref() {
            Some(t) => t.state >= TcpState::Established,
            None => flow.seen == [true, true],
        };
        let mut packet_unit = !pkt.payload.is_empty();
        let mut window: Option<(u64, u64)> = None;
        let mut reverse = false;
        if let (Some(tcp), Transport::Tcp(h), true) = (flow.tcp.as_mut(), &pkt.transport, pkt.checksum_ok) {
            let cfg = TcpConfig {
                midstream: self.config.midstream,
                limits: self.config.stream,
            };
            let up = tcp.track(
                dir.index(),
                h,
                pkt.payload,
                &cfg,
                &mut self.budget,
                &mut self.counters.stream,
            );
            established = up.established;
            if up.in_stream && !(inline && up.held) {
                packet_unit = false;
            } else if !pkt.payload.is_empty() && tcp.state >= TcpState::Established {
                self.counters.stream_fallback += 1;
            }
            let dns_port = flow.client.1 == 53 || flow.server.1 == 53;
            let midstream = tcp.midstream;
            for d in 0..2 {
                let Some(s) = tcp.streams[d].as_mut() else { continue };
                let edge = if inline { s.next() } else { s.acked_edge() };
                if s.app_progress < edge {
                    let (data, _) = s.window(s.app_progress, edge, 0);
                    let verdict = flow.app.feed_tcp(d == 0, data, dns_port, midstream);
                    s.app_progress = edge;
                    match verdict {
                        Detected::Proto(_) => self.counters.app_detected += 1,
                        Detected::Reversed(_) => {
                            self.counters.app_detected += 1;
                            reverse = true;
                        }
                        _ => {}
                    }
                }
                if s.fin.is_some_and(|f| s.app_progress >= f) {
                    flow.app.closed(d == 0);
                }
            }
            let s = tcp.streams[dir.index()].as_ref();
            if let Some(s) = s {
                let edge = if inline { s.next() } else { s.acked_edge() };
                if s.raw_progress < edge {
                    window = Some((s.raw_progress, edge));
                }
            }
        } else if pkt.protocol == proto::UDP && !pkt.fragment {
            let dns_port = flow.client.1 == 53 || flow.server.1 == 53;
            if let Detected::Proto(_) = flow.app.feed_udp(dir == Direction::ToServer, pkt.payload, dns_port) {
                self.counters.app_detected += 1;
            }
        }
        if reverse {
            // Detection found a midstream flow backwards on its first data: the
            // other end is the client.
            flow.swap();
            dir = match dir {
                Direction::ToServer => Direction::ToClient,
                Direction::ToClient => Direction::ToServer,
            };
            window = flow
                .tcp
                .as_ref()
                .and_then(|t| t.streams[dir.index()].as_ref())
                .and_then(|s| {
                    let edge = if inline { s.next() } else { s.acked_edge() };
                    (s.raw_progress < edge).then_some((s.raw_progress, edge))
                });
        }

        let (sp, dp) = pkt.ports();
        let ctx = Ctx {
            proto: pkt.protocol,
            src: pkt.src,
            dst: pkt.dst,
            sp,
            dp,
            has_ports: matches!(pkt.transport, Transport::Tcp(_) | Transport::Udp { .. }) && !pkt.fragment,
            direction: dir,
            established,
            app: flow.app.proto(),
            packet: Some(pkt),
        };
        let mut units: [Option<Unit<'_>>; 2] = [None, None];
        if let (Some((from, to)), Some(tcp)) = (window, flow.tcp.as_ref()) {
            if let Some(s) = tcp.streams[dir.index()].as_ref() {
                let (data, origin) = s.window(from, to, lookbehind);
                units[0] = Some(Unit {
                    data,
                    origin,
                    stream: true,
                });
            }
        }
        if packet_unit {
            units[1] = Some(Unit {
                data: pkt.payload,
                origin: 0,
                stream: false,
            });
        }
        self.matches.clear();
        let det = &self.detectors[usize::from(flow.profile.0)];
        let rules = &*self.rules;
        let budget = self.config.inspection_budget;
        let class = ProtoClass::of(pkt.protocol) as usize;
        let mut exhausted = 0u64;
        if first_in_dir {
            for &id in &det.ip_only[class] {
                let sig = rules.get(id);
                if sig.header_matches(ctx.proto, ctx.src, ctx.sp, ctx.dst, ctx.dp, ctx.has_ports) {
                    apply_flowbits(sig, &mut flow.detect);
                    self.matches.push(Match {
                        sig: id,
                        direction: dir,
                        tx: None,
                        stream: false,
                        src: ctx.src,
                        dst: ctx.dst,
                    });
                }
            }
        }
        // Packet and payload signatures, merged in evaluation order.
        let cands = &mut self.candidates;
        let scan = &mut self.scan;
        cands.reset(rules.len());
        det.packet[class].iter().for_each(|&id| cands.add(id));
        let units_present = units.iter().flatten().count() > 0;
        if units_present {
            if let Some(pf) = &det.payload_prefilter {
                for u in units.iter().flatten() {
                    pf.scan(u.data, scan, cands);
                }
            }
            det.payload_always[class].iter().for_each(|&id| cands.add(id));
        }
        cands.sort();
        for &id in &cands.list {
            let sig = rules.get(id);
            let mut stream_hit = false;
            let ok = eval_packet_sig(sig, &ctx, &flow.detect, &units, budget, &mut exhausted, &mut stream_hit);
            if ok {
                apply_flowbits(sig, &mut flow.detect);
                self.matches.push(Match {
                    sig: id,
                    direction: dir,
                    tx: None,
                    stream: stream_hit,
                    src: ctx.src,
                    dst: ctx.dst,
                });
            }
        }
        // Transactions.
        if flow.app.has_updates() {
            let client = flow.client;
            let server = flow.server;
            let tx_established = established || flow.tcp.as_ref().is_some_and(|t| t.state >= TcpState::Established);
            let detect = &mut flow.detect;
            let matches = &mut self.matches;
            let cands = &mut self.candidates;
            let scan = &mut self.scan;
            let app = flow.app.proto();
            let http2 = flow.app.name() == Some("http2");
            let mut logs = self.config.app_logs.then_some(&mut self.app_logs);
            flow.app.drain_updates(false, |tx, log| {
                if log && let Some(l) = logs.as_deref_mut() {
                    l.push(AppRecord::of(tx, http2));
                }
                eval_tx(
                    rules,
                    det,
                    tx,
                    TxCtx {
                        proto: ctx.proto,
                        client,
                        server,
                        established: tx_established,
                        app,
                    },
                    detect,
                    &units,
                    cands,
                    scan,
                    matches,
                    budget,
                    &mut exhausted,
                );
            });
        }
        // Raw stream data now inspected: move progress, free what both consumers passed.
        if let Some(tcp) = flow.tcp.as_mut() {
            if let Some((_, to)) = window
                && let Some(s) = tcp.streams[dir.index()].as_mut()
            {
                s.raw_progress = to;
            }
            for s in tcp.streams.iter_mut().flatten() {
                let keep = s.raw_progress.min(s.app_progress).saturating_sub(lookbehind as u64);
                s.release_before(keep, &mut self.budget);
                if s.skip_acked_gap(&mut self.counters.stream) > 0 {
                    flow.app = crate::app::AppState::Unknown;
                }
            }
        }
        self.counters.budget_exhausted += exhausted;
        self.finalize(flow, now, alerts)
    }

    /// Makes `flow` fit this inspector: a flow whose detection state was
    /// built under another ruleset starts its detection state afresh
    /// (flowbits, thresholds and per-transaction progress refer to the old
    /// signatures); a profile this inspector does not have becomes its first
    /// one. Both are counted.
    fn adopt(&mut self, flow: &mut FlowState) {
        let generation = self.rules.generation();
        if flow.detect.generation != generation {
            if flow.detect.generation != 0 {
                self.counters.ruleset_changes += 1;
            }
            flow.detect = DetectState {
                generation,
                alerted: flow.detect.alerted,
                ..DetectState::default()
            };
        }
        if usize::from(flow.profile.0) >= self.detectors.len() {
            self.counters.unknown_profile += 1;
            flow.profile = ProfileId(0);
        }
    }

    /// Inspects what the flow still holds when it ends: stream data not yet
    /// inspected (acknowledged or not), and transactions the end of data
    /// completes. Call it once when the flow is removed.
    pub fn flush(&mut self, flow: &mut FlowState, now: Duration, alerts: &mut Vec<Alert>) -> Outcome {
        self.adopt(flow);
        if flow.verdict != FlowVerdict::Inspect {
            if let Some(t) = flow.tcp.as_mut() {
                t.release(&mut self.budget);
            }
            return Outcome::Pass;
        }
        let lookbehind = self.rules.lookbehind();
        let budget = self.config.inspection_budget;
        let mut exhausted = 0u64;
        self.matches.clear();
        let det = &self.detectors[usize::from(flow.profile.0)];
        let rules = &*self.rules;
        if let Some(tcp) = flow.tcp.as_mut() {
            let dns_port = flow.client.1 == 53 || flow.server.1 == 53;
            let midstream = tcp.midstream;
            for d in 0..2 {
                let Some(s) = tcp.streams[d].as_mut() else { continue };
                if s.app_progress < s.next() {
                    let (data, _) = s.window(s.app_progress, s.next(), 0);
                    let _ = flow.app.feed_tcp(d == 0, data, dns_port, midstream);
                    s.app_progress = s.next();
                }
                flow.app.closed(d == 0);
            }
            let established = tcp.state >= TcpState::Established;
            for d in 0..2 {
                let dir = if d == 0 {
                    Direction::ToServer
                } else {
                    Direction::ToClient
                };
                let Some(s) = tcp.streams[d].as_ref() else { continue };
                if s.raw_progress >= s.next() {
                    continue;
                }
                let (data, origin) = s.window(s.raw_progress, s.next(), lookbehind);
                let units = [
                    Some(Unit {
                        data,
                        origin,
                        stream: true,
                    }),
                    None,
                ];
                let ((src, sp), (dst, dp)) = if d == 0 {
                    (flow.client, flow.server)
                } else {
                    (flow.server, flow.client)
                };
                let ctx = Ctx {
                    proto: flow.protocol,
                    src,
                    dst,
                    sp,
                    dp,
                    has_ports: true,
                    direction: dir,
                    established,
                    app: flow.app.proto(),
                    packet: None,
                };
                let cands = &mut self.candidates;
                let scan = &mut self.scan;
                cands.reset(rules.len());
                if let Some(pf) = &det.payload_prefilter {
                    pf.scan(data, scan, cands);
                }
                det.payload_always[ProtoClass::Tcp as usize]
                    .iter()
                    .for_each(|&id| cands.add(id));
                cands.sort();
                for &id in &cands.list {
                    let sig = rules.get(id);
                    if sig.kind != SigKind::Payload {
                        continue;
                    }
                    let mut stream_hit = false;
                    if eval_packet_sig(sig, &ctx, &flow.detect, &units, budget, &mut exhausted, &mut stream_hit) {
                        apply_flowbits(sig, &mut flow.detect);
                        self.matches.push(Match {
                            sig: id,
                            direction: dir,
                            tx: None,
                            stream: true,
                            src,
                            dst,
                        });
                    }
                }
            }
            for s in tcp.streams.iter_mut().flatten() {
                s.raw_progress = s.next();
            }
        }
        if flow.app.has_updates() || flow.app.has_unlogged() {
            let client = flow.client;
            let server = flow.server;
            let established =
                flow.seen == [true, true] || flow.tcp.as_ref().is_some_and(|t| t.state >= TcpState::Established);
            let detect = &mut flow.detect;
            let matches = &mut self.matches;
            let cands = &mut self.candidates;
            let scan = &mut self.scan;
            let app = flow.app.proto();
            let proto = flow.protocol;
            let http2 = flow.app.name() == Some("http2");
            let mut logs = self.config.app_logs.then_some(&mut self.app_logs);
            flow.app.drain_updates(true, |tx, log| {
                if log && let Some(l) = logs.as_deref_mut() {
                    l.push(AppRecord::of(tx, http2));
                }
                eval_tx(
                    rules,
                    det,
                    tx,
                    TxCtx {
                        proto,
                        client,
                        server,
                        established,
                        app,
                    },
                    detect,
                    &[None, None],
                    cands,
                    scan,
                    matches,
                    budget,
                    &mut exhausted,
                );
            });
        }
        self.counters.budget_exhausted += exhausted;
        let outcome = self.finalize(flow, now, alerts);
        if let Some(t) = flow.tcp.as_mut() {
            t.release(&mut self.budget);
        }
        outcome
    }

    /// A packet that belongs to `flow` without being one of its own: an ICMP
    /// error quoting it. It shares the flow's verdict; otherwise only packet
    /// signatures are evaluated on it, without touching the flow's state.
    fn related(&mut self, flow: &mut FlowState, pkt: &Packet<'_>, now: Duration, alerts: &mut Vec<Alert>) -> Outcome {
        match flow.verdict {
            FlowVerdict::Drop => {
                self.counters.dropped_flow_packets += 1;
                return Outcome::Drop(DropReason::FlowDrop);
            }
            FlowVerdict::Pass => {
                self.counters.passed_flow_packets += 1;
                return Outcome::Pass;
            }
            FlowVerdict::Inspect => {}
        }
        self.adopt(flow);
        let (sp, dp) = pkt.ports();
        let dir = if pkt.src == flow.client.0 {
            Direction::ToServer
        } else {
            Direction::ToClient
        };
        let ctx = Ctx {
            proto: pkt.protocol,
            src: pkt.src,
            dst: pkt.dst,
            sp,
            dp,
            has_ports: false,
            direction: dir,
            established: false,
            app: None,
            packet: Some(pkt),
        };
        let units = [
            None,
            (!pkt.payload.is_empty()).then_some(Unit {
                data: pkt.payload,
                origin: 0,
                stream: false,
            }),
        ];
        self.matches.clear();
        let det = &self.detectors[usize::from(flow.profile.0)];
        let rules = &*self.rules;
        let class = ProtoClass::of(pkt.protocol) as usize;
        let mut exhausted = 0;
        let cands = &mut self.candidates;
        let scan = &mut self.scan;
        cands.reset(rules.len());
        det.packet[class].iter().for_each(|&id| cands.add(id));
        if let (Some(pf), Some(u)) = (&det.payload_prefilter, units[1]) {
            pf.scan(u.data, scan, cands);
            det.payload_always[class].iter().for_each(|&id| cands.add(id));
        }
        cands.sort();
        let mut scratch = DetectState::default();
        for &id in &cands.list {
            let sig = rules.get(id);
            // Flowbits belong to the flow the error quotes; a rule testing them is not for this packet.
            if !sig.flowbit_tests.is_empty() || !sig.flowbit_ops.is_empty() {
                continue;
            }
            let mut stream_hit = false;
            if eval_packet_sig(
                sig,
                &ctx,
                &scratch,
                &units,
                self.config.inspection_budget,
                &mut exhausted,
                &mut stream_hit,
            ) {
                self.matches.push(Match {
                    sig: id,
                    direction: dir,
                    tx: None,
                    stream: false,
                    src: ctx.src,
                    dst: ctx.dst,
                });
            }
        }
        scratch.flowbits.clear();
        self.counters.budget_exhausted += exhausted;
        self.finalize(flow, now, alerts)
    }

    /// Pass rules, thresholds, actions, alerts.
    fn finalize(&mut self, flow: &mut FlowState, now: Duration, alerts: &mut Vec<Alert>) -> Outcome {
        if self.matches.is_empty() {
            return Outcome::Pass;
        }
        let det = &self.detectors[usize::from(flow.profile.0)];
        let rules = &*self.rules;
        self.matches.sort_by_key(|m| m.sig);
        if let Some(pass) = self
            .matches
            .iter()
            .find(|m| rules.get(m.sig).rule.action == Action::Pass && !det.is_silent(m.sig))
        {
            if rules.get(pass.sig).kind == SigKind::IpOnly {
                flow.verdict = FlowVerdict::Pass;
            }
            return Outcome::Pass;
        }
        let ips = self.config.mode == Mode::Ips;
        let mut outcome = Outcome::Pass;
        let mut raised = 0usize;
        for m in &self.matches {
            if det.is_silent(m.sig) {
                continue;
            }
            let sig = rules.get(m.sig);
            let rule = &sig.rule;
            if let Some(t) = rule.threshold.as_ref().or(rule.detection_filter.as_ref()) {
                let alerts_now = if t.track == crate::rules::Track::ByFlow {
                    judge(t, flow.detect.threshold(m.sig), now)
                } else {
                    self.hosts.judge(m.sig, t, m.src, m.dst, now)
                };
                if !alerts_now {
                    self.counters.alerts_suppressed += 1;
                    continue;
                }
            }
            let action = match rule.action {
                Action::Drop if ips => {
                    if !matches!(outcome, Outcome::Drop(_) | Outcome::Reject(_)) {
                        outcome = Outcome::Drop(DropReason::Rules(m.sig));
                    }
                    flow.verdict = FlowVerdict::Drop;
                    AlertAction::Blocked
                }
                Action::Reject => {
                    if !matches!(outcome, Outcome::Reject(_)) {
                        outcome = Outcome::Reject(DropReason::Rules(m.sig));
                    }
                    if ips {
                        flow.verdict = FlowVerdict::Drop;
                    }
                    AlertAction::Blocked
                }
                _ => AlertAction::Allowed,
            };
            if rule.noalert {
                continue;
            }
            if !sig.suppress.is_empty() && sig.suppressed(m.src, m.dst) {
                self.counters.alerts_suppressed += 1;
                continue;
            }
            if raised >= self.config.max_alerts_per_packet {
                self.counters.alerts_discarded += 1;
                continue;
            }
            raised += 1;
            alerts.push(Alert {
                sig: m.sig,
                direction: m.direction,
                action,
                tx: m.tx,
                stream: m.stream,
            });
            flow.detect.alerted = true;
            self.counters.alerts += 1;
            if outcome == Outcome::Pass {
                outcome = Outcome::Alert;
            }
        }
        match outcome {
            Outcome::Drop(_) => self.counters.drops += 1,
            Outcome::Reject(_) => self.counters.rejects += 1,
            _ => {}
        }
        outcome
    }
}

fn apply_flowbits(sig: &Signature, detect: &mut DetectState) {
    for op in &sig.flowbit_ops {
        match *op {
            FlowbitOp::Set(b) => detect.set_flowbit(b, true),
            FlowbitOp::Unset(b) => detect.set_flowbit(b, false),
            FlowbitOp::Toggle(b) => {
                let v = detect.flowbit(b);
                detect.set_flowbit(b, !v);
            }
        }
    }
}

fn flowbits_hold(sig: &Signature, detect: &DetectState) -> bool {
    sig.flowbit_tests.iter().all(|t| match t {
        FlowbitTest::IsSet(bits) => bits.iter().any(|&b| detect.flowbit(b)),
        FlowbitTest::IsNotSet(bits) => bits.iter().any(|&b| !detect.flowbit(b)),
    })
}

fn flow_options_hold(sig: &Signature, direction: Direction, established: bool) -> bool {
    let f = &sig.rule.flow;
    !(f.established && !established
        || f.not_established && established
        || f.to_server && direction != Direction::ToServer
        || f.to_client && direction != Direction::ToClient)
}

fn packet_checks_hold(sig: &Signature, pkt: Option<&Packet<'_>>) -> bool {
    if sig.rule.packet.is_empty() {
        return true;
    }
    let Some(p) = pkt else { return false };
    sig.rule.packet.iter().all(|c| match *c {
        PacketCheck::Dsize(m) => m.matches(p.payload.len() as u64),
        PacketCheck::Flags(f) => p.tcp().is_some_and(|t| f.matches(t.flags)),
        PacketCheck::Itype(m) => {
            matches!(p.transport, Transport::Icmp { icmp_type, .. } if m.matches(u64::from(icmp_type)))
        }
        PacketCheck::Icode(m) => matches!(p.transport, Transport::Icmp { code, .. } if m.matches(u64::from(code))),
        PacketCheck::Ttl(m) => m.matches(u64::from(p.ttl)),
        PacketCheck::IpProto(m) => m.matches(u64::from(p.protocol)),
    })
}

/// Evaluates a packet, payload (or app-protocol-only) signature on a packet's units.
fn eval_packet_sig(
    sig: &Signature,
    ctx: &Ctx<'_>,
    detect: &DetectState,
    units: &[Option<Unit<'_>>; 2],
    budget: u32,
    exhausted: &mut u64,
    stream_hit: &mut bool,
) -> bool {
    if matches!(sig.kind, SigKind::Tx(_) | SigKind::IpOnly) {
        return false;
    }
    if let Protocol::App(p) = sig.rule.protocol
        && ctx.app != Some(p)
    {
        return false;
    }
    if !sig.header_matches(ctx.proto, ctx.src, ctx.sp, ctx.dst, ctx.dp, ctx.has_ports)
        || !flow_options_hold(sig, ctx.direction, ctx.established)
        || !packet_checks_hold(sig, ctx.packet)
        || !flowbits_hold(sig, detect)
    {
        return false;
    }
    let Some(program) = &sig.payload else { return true };
    for u in units.iter().flatten() {
        if (u.stream && sig.packet_only) || (!u.stream && sig.stream_only) {
            continue;
        }
        if run(program, u.data, u.origin, budget, exhausted) {
            *stream_hit = u.stream;
            return true;
        }
    }
    false
}

fn run(program: &Program, data: &[u8], origin: usize, budget: u32, exhausted: &mut u64) -> bool {
    let mut b = budget;
    let hit = program.matches(data, origin, &mut b);
    if b == 0 {
        *exhausted += 1;
    }
    hit
}

#[derive(Debug, Clone, Copy)]
struct TxCtx {
    proto: u8,
    client: (IpAddr, u16),
    server: (IpAddr, u16),
    established: bool,
    app: Option<AppProto>,
}

enum TxResult {
    Match,
    Fail,
    Wait,
}

#[allow(clippy::too_many_arguments)]
fn eval_tx(
    rules: &RuleSet,
    det: &Detector,
    tx: &TxView<'_>,
    ctx: TxCtx,
    detect: &mut DetectState,
    units: &[Option<Unit<'_>>; 2],
    cands: &mut Candidates,
    scan: &mut ScanScratch,
    matches: &mut Vec<Match>,
    budget: u32,
    exhausted: &mut u64,
) {
    let proto = tx.proto();
    cands.reset(rules.len());
    for b in Buffer::ALL {
        if b.app_proto() != Some(proto) {
            continue;
        }
        let Some(pf) = &det.tx_prefilter[b.index()] else {
            continue;
        };
        for to_client in [false, true] {
            if to_client && b != Buffer::HttpHeader {
                continue;
            }
            match tx.buffer(b, to_client) {
                BufState::One(d) => pf.scan(d, scan, cands),
                BufState::Many(v) => v.iter().for_each(|d| pf.scan(d, scan, cands)),
                _ => {}
            }
        }
    }
    det.tx_always_for(proto).iter().for_each(|&id| cands.add(id));
    cands.sort();
    for &id in &cands.list {
        if detect.tx_done(proto, tx.id(), id) {
            continue;
        }
        let sig = rules.get(id);
        let to_server = sig.tx_to_server;
        let ((src, sp), (dst, dp)) = if to_server {
            (ctx.client, ctx.server)
        } else {
            (ctx.server, ctx.client)
        };
        let direction = if to_server {
            Direction::ToServer
        } else {
            Direction::ToClient
        };
        let result = if !sig.header_matches(ctx.proto, src, sp, dst, dp, true)
            || !flow_options_direction_hold(sig, direction)
            || ctx.app != Some(proto)
        {
            TxResult::Fail
        } else if (sig.rule.flow.established && !ctx.established) || !flowbits_hold(sig, detect) {
            TxResult::Wait
        } else {
            eval_tx_buffers(sig, tx, units, budget, exhausted)
        };
        match result {
            TxResult::Match => {
                apply_flowbits(sig, detect);
                detect.mark_tx_done(proto, tx.id(), id);
                matches.push(Match {
                    sig: id,
                    direction,
                    tx: Some((proto, tx.id())),
                    stream: false,
                    src,
                    dst,
                });
            }
            TxResult::Fail => detect.mark_tx_done(proto, tx.id(), id),
            TxResult::Wait => {}
        }
    }
}

fn flow_options_direction_hold(sig: &Signature, direction: Direction) -> bool {
    let f = &sig.rule.flow;
    !(f.to_server && direction != Direction::ToServer || f.to_client && direction != Direction::ToClient)
}

fn eval_tx_buffers(
    sig: &Signature,
    tx: &TxView<'_>,
    units: &[Option<Unit<'_>>; 2],
    budget: u32,
    exhausted: &mut u64,
) -> TxResult {
    for (b, program) in &sig.buffers {
        let sides: &[bool] = if *b == Buffer::HttpHeader {
            if sig.rule.flow.to_client {
                &[true]
            } else if sig.rule.flow.to_server {
                &[false]
            } else {
                &[false, true]
            }
        } else {
            &[false]
        };
        let mut pending = false;
        let mut hit = false;
        for &to_client in sides {
            match tx.buffer(*b, to_client) {
                BufState::Pending => pending = true,
                BufState::Absent => {}
                BufState::One(d) => hit |= run(program, d, 0, budget, exhausted),
                BufState::Many(v) => hit |= v.iter().any(|d| run(program, d, 0, budget, exhausted)),
            }
            if hit {
                break;
            }
        }
        if !hit {
            return if pending { TxResult::Wait } else { TxResult::Fail };
        }
    }
    if let Some(program) = &sig.payload {
        let hit = units
            .iter()
            .flatten()
            .any(|u| run(program, u.data, u.origin, budget, exhausted));
        if !hit {
            return TxResult::Wait;
        }
    }
    TxResult::Match
}

//! Inspection of a capture, offline: the flow table a datapath would keep,
//! around the same engine, producing EVE records.
//!
//! [`Replay`] is fed frames in capture order with their timestamps (it reads
//! no file itself) and appends EVE JSON lines to a vector. Flows are keyed
//! by protocol and both endpoints (ICMP echo also by identifier); an ICMP
//! error joins the flow of the packet it quotes. A flow ends when it has been
//! idle longer than its timeout (Suricata's defaults: TCP 60 s before the
//! handshake completes and after it closes, 600 s established; others 30 s,
//! then 300 s once both directions were seen), when a new SYN reuses the
//! addresses of a closed TCP connection, or at the end of the capture; its
//! remaining data is then inspected ([`Inspector::flush`]) and its `flow`
//! record written.

use core::net::IpAddr;
use std::collections::HashMap;
use std::time::Duration;

use crate::decode::{self, LinkType, Skip};
use crate::engine::{Alert, DropReason, Inspector, Outcome};
use crate::eve::{self, EveOptions, Identity, Tuple};
use crate::flow::{Direction, FlowState, ProfileId};
use crate::packet::{Packet, Transport, tcp_flags};
use crate::tcp::TcpState;

/// Replay settings.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// Skip packets whose checksums are wrong (as Suricata does unless `-k none`).
    pub validate_checksums: bool,
    /// Which EVE records to write.
    pub eve: EveOptions,
    /// Identity fields to add to every record.
    pub identity: Option<Identity>,
}

/// Frames that yielded nothing to inspect, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayStats {
    /// Frames read.
    pub frames: u64,
    /// IP packets inspected (a tunnelled frame counts its inner packets too).
    pub packets: u64,
    /// Frames that were not IP.
    pub not_ip: u64,
    /// Frames with malformed headers.
    pub malformed: u64,
    /// TCP segments with a wrong checksum (inspected as packets, not reassembled).
    pub bad_checksum: u64,
    /// Frames of an unsupported link type.
    pub bad_link: u64,
    /// Flows seen.
    pub flows: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowKey {
    proto: u8,
    a: (IpAddr, u16),
    b: (IpAddr, u16),
    icmp_id: u16,
}

impl FlowKey {
    fn new(proto: u8, src: (IpAddr, u16), dst: (IpAddr, u16), icmp_id: u16) -> Self {
        let (a, b) = if src <= dst { (src, dst) } else { (dst, src) };
        FlowKey { proto, a, b, icmp_id }
    }
}

struct Entry {
    state: FlowState,
    id: u64,
    start: Duration,
    last: Duration,
    drop_logged: [bool; 2],
    icmp: Option<(u8, u8)>,
}

/// A capture replay. See the module documentation.
pub struct Replay {
    inspector: Inspector,
    profile: ProfileId,
    options: ReplayOptions,
    flows: HashMap<FlowKey, Entry>,
    next_flow_id: u64,
    last_sweep: Duration,
    now: Duration,
    stats: ReplayStats,
    alerts: Vec<Alert>,
}

impl core::fmt::Debug for Replay {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Replay").field("stats", &self.stats).finish()
    }
}

fn timeout(state: &FlowState) -> Duration {
    let secs = match state.tcp_state() {
        Some(TcpState::Established | TcpState::Closing) => 600,
        Some(_) => 60,
        None if state.counts().packets.iter().all(|&n| n > 0) => 300,
        None => 30,
    };
    Duration::from_secs(secs)
}

impl Replay {
    /// A replay inspecting every flow under `profile`.
    pub fn new(inspector: Inspector, profile: ProfileId, options: ReplayOptions) -> Replay {
        Replay {
            inspector,
            profile,
            options,
            flows: HashMap::new(),
            next_flow_id: 1,
            last_sweep: Duration::ZERO,
            now: Duration::ZERO,
            stats: ReplayStats::default(),
            alerts: Vec::new(),
        }
    }

    /// The inspector (for its counters).
    pub fn inspector(&self) -> &Inspector {
        &self.inspector
    }

    /// Counts so far.
    pub fn stats(&self) -> ReplayStats {
        self.stats
    }

    /// Handles one captured frame; EVE lines go to `out`.
    pub fn frame(&mut self, link: LinkType, ts: Duration, frame: &[u8], out: &mut Vec<String>) {
        self.stats.frames += 1;
        let pcap_cnt = self.stats.frames;
        self.now = self.now.max(ts);
        if self.now.saturating_sub(self.last_sweep) >= Duration::from_secs(10) {
            self.sweep(out);
            self.last_sweep = self.now;
        }
        let decoded = decode::decode(link, frame, self.options.validate_checksums);
        match decoded.skipped {
            Some(Skip::NotIp) if decoded.packets.is_empty() => self.stats.not_ip += 1,
            Some(Skip::Malformed) if decoded.packets.is_empty() => self.stats.malformed += 1,
            Some(Skip::LinkType(_)) => self.stats.bad_link += 1,
            _ => {}
        }
        self.stats.bad_checksum += u64::from(decoded.bad_checksums);
        for pkt in &decoded.packets {
            self.stats.packets += 1;
            self.packet(pkt, ts, pcap_cnt, out);
        }
    }

    fn key_of(pkt: &Packet<'_>) -> FlowKey {
        let (sp, dp) = pkt.ports();
        let icmp_id = match pkt.transport {
            Transport::Icmp { echo_id: Some(id), .. } => id,
            _ => 0,
        };
        FlowKey::new(pkt.protocol, (pkt.src, sp), (pkt.dst, dp), icmp_id)
    }

    fn packet(&mut self, pkt: &Packet<'_>, ts: Duration, pcap_cnt: u64, out: &mut Vec<String>) {
        if !wants_flow(pkt) {
            self.flowless(pkt, ts, pcap_cnt, out);
            return;
        }
        // An ICMP error joins the flow it quotes, when that flow exists.
        if pkt.is_icmp_error()
            && let Some((src, dst, proto, sp, dp)) = decode::quoted_flow(pkt.payload)
        {
            let key = FlowKey::new(proto, (src, sp), (dst, dp), 0);
            if self.flows.contains_key(&key) {
                self.inspect(key, pkt, ts, pcap_cnt, out);
                return;
            }
        }
        let key = Self::key_of(pkt);
        let reuse = match self.flows.get(&key) {
            Some(e) => {
                let idle = ts.saturating_sub(e.last) > timeout(&e.state);
                let syn = pkt
                    .tcp()
                    .is_some_and(|t| t.flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN);
                let closed = e.state.tcp_state() == Some(TcpState::Closed);
                if idle {
                    Some("timeout")
                } else if syn && closed {
                    Some("tcp_reuse")
                } else {
                    None
                }
            }
            None => None,
        };
        if let Some(reason) = reuse
            && let Some(e) = self.flows.remove(&key)
        {
            self.end(e, reason, out);
        }
        if !self.flows.contains_key(&key) {
            let icmp = match pkt.transport {
                Transport::Icmp { icmp_type, code, .. } => Some((icmp_type, code)),
                _ => None,
            };
            self.stats.flows += 1;
            let id = self.next_flow_id;
            self.next_flow_id += 1;
            self.flows.insert(
                key,
                Entry {
                    state: FlowState::new(self.profile, pkt),
                    id,
                    start: ts,
                    last: ts,
                    drop_logged: [false; 2],
                    icmp,
                },
            );
        }
        self.inspect(key, pkt, ts, pcap_cnt, out);
    }

    fn inspect(&mut self, key: FlowKey, pkt: &Packet<'_>, ts: Duration, pcap_cnt: u64, out: &mut Vec<String>) {
        let Some(e) = self.flows.get_mut(&key) else { return };
        e.last = e.last.max(ts);
        self.alerts.clear();
        let outcome = self.inspector.inspect(&mut e.state, pkt, ts, &mut self.alerts);
        let rules = self.inspector.rules().clone();
        let identity = self.options.identity.as_ref();
        let app = e.state.app_name();
        let icmp = match pkt.transport {
            Transport::Icmp { icmp_type, code, .. } => Some((icmp_type, code)),
            _ => None,
        };
        let packet_tuple = {
            let (sp, dp) = pkt.ports();
            Tuple {
                proto: pkt.protocol,
                src: pkt.src,
                sp,
                dst: pkt.dst,
                dp,
                icmp,
            }
        };
        let pkt_dir = e.state.direction(pkt);
        for rec in self.inspector.app_logs().drain(..) {
            if eve::wants(&self.options.eve, &rec) {
                let t = flow_tuple(&e.state, Direction::ToServer, None);
                for v in eve::app_records(&rec, ts, e.id, Some(pcap_cnt), &t, identity) {
                    out.push(v.to_string());
                }
            }
        }
        if self.options.eve.alert {
            for a in &self.alerts {
                let tuple = if pkt_dir.is_none_or(|d| d == a.direction) {
                    packet_tuple
                } else {
                    flow_tuple(&e.state, a.direction, icmp)
                };
                let v = eve::alert_record(&rules, a, ts, Some(e.id), Some(pcap_cnt), &tuple, app, identity);
                out.push(v.to_string());
            }
        }
        let dropped = match outcome {
            Outcome::Drop(r) | Outcome::Reject(r) if self.inspector.config().mode == crate::Mode::Ips => Some(r),
            _ => None,
        };
        if let (Some(reason), Some(log)) = (dropped, self.options.eve.drop) {
            let d = pkt_dir.unwrap_or(if pkt.src == e.state.client().0 {
                Direction::ToServer
            } else {
                Direction::ToClient
            });
            let by_rule = matches!(reason, DropReason::Rules(_));
            let log_it = !log.flows_start || by_rule || !e.drop_logged[d.index()];
            if log_it {
                e.drop_logged[d.index()] = true;
                let cause = match reason {
                    DropReason::Rules(sig) if log.alerts => self.alerts.iter().find(|a| a.sig == sig),
                    _ => None,
                };
                let text = match reason {
                    DropReason::Rules(_) => "rules",
                    DropReason::FlowDrop => "flow drop",
                };
                let v = eve::drop_record(
                    &rules,
                    cause,
                    text,
                    ts,
                    Some(e.id),
                    Some(pcap_cnt),
                    &packet_tuple,
                    pkt.ip_len,
                    pkt.ttl,
                    app,
                    identity,
                );
                out.push(v.to_string());
            }
        }
    }

    /// A packet of a protocol without flows (IGMP, PIM, …) or a fragment:
    /// inspected on its own, every time as a flow's first packet, and not
    /// recorded as a flow (Suricata keeps no flow for these either).
    fn flowless(&mut self, pkt: &Packet<'_>, ts: Duration, pcap_cnt: u64, out: &mut Vec<String>) {
        let mut state = FlowState::new(self.profile, pkt);
        self.alerts.clear();
        let _ = self.inspector.inspect(&mut state, pkt, ts, &mut self.alerts);
        self.inspector.app_logs().clear();
        if self.options.eve.alert {
            let rules = self.inspector.rules().clone();
            let (sp, dp) = pkt.ports();
            let tuple = Tuple {
                proto: pkt.protocol,
                src: pkt.src,
                sp,
                dst: pkt.dst,
                dp,
                icmp: None,
            };
            for a in &self.alerts {
                let v = eve::alert_record(
                    &rules,
                    a,
                    ts,
                    None,
                    Some(pcap_cnt),
                    &tuple,
                    None,
                    self.options.identity.as_ref(),
                );
                out.push(v.to_string());
            }
        }
    }

    fn end(&mut self, mut e: Entry, reason: &str, out: &mut Vec<String>) {
        self.alerts.clear();
        let _ = self.inspector.flush(&mut e.state, e.last, &mut self.alerts);
        let rules = self.inspector.rules().clone();
        let identity = self.options.identity.as_ref();
        for rec in self.inspector.app_logs().drain(..) {
            if eve::wants(&self.options.eve, &rec) {
                let t = flow_tuple(&e.state, Direction::ToServer, None);
                for v in eve::app_records(&rec, e.last, e.id, None, &t, identity) {
                    out.push(v.to_string());
                }
            }
        }
        if self.options.eve.alert {
            for a in &self.alerts {
                let tuple = flow_tuple(&e.state, a.direction, e.icmp);
                let v = eve::alert_record(
                    &rules,
                    a,
                    e.last,
                    Some(e.id),
                    None,
                    &tuple,
                    e.state.app_name(),
                    identity,
                );
                out.push(v.to_string());
            }
        }
        if self.options.eve.flow {
            out.push(eve::flow_record(&e.state, e.id, e.start, e.last, reason, e.icmp, identity).to_string());
        }
    }

    /// Ends flows idle past their timeout.
    fn sweep(&mut self, out: &mut Vec<String>) {
        let now = self.now;
        let expired: Vec<FlowKey> = self
            .flows
            .iter()
            .filter(|(_, e)| now.saturating_sub(e.last) > timeout(&e.state))
            .map(|(k, _)| *k)
            .collect();
        let mut ended: Vec<Entry> = expired.iter().filter_map(|k| self.flows.remove(k)).collect();
        ended.sort_by_key(|e| e.id);
        for e in ended {
            self.end(e, "timeout", out);
        }
    }

    /// Ends every flow (the capture is over).
    pub fn finish(&mut self, out: &mut Vec<String>) {
        let mut all: Vec<Entry> = self.flows.drain().map(|(_, e)| e).collect();
        all.sort_by_key(|e| e.id);
        for e in all {
            self.end(e, "shutdown", out);
        }
    }
}

/// Protocols that get a flow: those with ports or echo identifiers, and the
/// tunnels (GRE, ESP) Suricata keys flows for; not fragments.
fn wants_flow(pkt: &Packet<'_>) -> bool {
    !pkt.fragment && matches!(pkt.protocol, 1 | 6 | 17 | 47 | 50 | 58 | 132)
}

fn flow_tuple(flow: &FlowState, dir: Direction, icmp: Option<(u8, u8)>) -> Tuple {
    let (c, s) = (flow.client(), flow.server());
    let ((src, sp), (dst, dp)) = match dir {
        Direction::ToServer => (c, s),
        Direction::ToClient => (s, c),
    };
    Tuple {
        proto: flow.protocol(),
        src,
        sp,
        dst,
        dp,
        icmp,
    }
}

//! Flow events of the engine → flow records of the audit trail.
//!
//! The engine reports connections by flow key, with rule-registry indices and
//! its own clock; a record must stand on its own for years, so this module
//! resolves both ends to their identity in the inventory (as of the policy the
//! agent runs), the rule indices to rule ids and levels, and the engine's
//! clock to Unix time.

use std::collections::HashMap;
use std::net::IpAddr;

use palisade_audit::record::{self, Decision, Endpoint, FlowRecord, IcmpMessage, Phase, Verdict, VmIdentity};
use palisade_datapath::port::canonical_ip;
use palisade_datapath::{DropReason, Engine};
use palisade_datapath::{EndReason, EventKind, FlowEvent};
use palisade_policy::model::Model;
use palisade_wire::flow::FlowKey;
use palisade_wire::ip::IpProtocol;

/// Who is behind each managed address.
#[derive(Debug, Clone, Default)]
pub struct Identities {
    by_ip: HashMap<IpAddr, VmIdentity>,
}

impl Identities {
    /// Index every vNIC address of the inventory.
    pub fn new(model: &Model) -> Identities {
        let mut by_ip = HashMap::new();
        for (vm, nic) in model.inventory.vnics() {
            let id = VmIdentity {
                name: vm.name.clone(),
                uuid: vm.uuid.clone(),
                vnic: nic.name.clone(),
                zone: nic.zone.clone(),
                cluster: vm.cluster.clone(),
                host: vm.host.clone(),
                tags: vm.tags.clone(),
            };
            for ip in &nic.ips {
                by_ip.insert(canonical_ip(*ip), id.clone());
            }
        }
        Identities { by_ip }
    }

    /// The managed VM behind `ip`, if any.
    pub fn of(&self, ip: IpAddr) -> Option<&VmIdentity> {
        self.by_ip.get(&canonical_ip(ip))
    }
}

/// Converts the engine's clock (nanoseconds from the agent's start) to Unix time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    /// Unix time (ns) at engine time 0.
    pub unix_at_zero: u64,
}

impl Clock {
    /// Unix time of engine time `t`.
    pub fn unix(self, t: u64) -> u64 {
        self.unix_at_zero.saturating_add(t)
    }
}

/// The record of one event; `None` for events the trail does not keep
/// (state changes inside a connection's life, which the next update or end record covers).
pub fn flow_record(
    event: &FlowEvent,
    host: &str,
    engine: &Engine,
    identities: &Identities,
    clock: Clock,
) -> Option<FlowRecord> {
    let (phase, verdict) = match event.kind {
        EventKind::Start => (Phase::Start, Verdict::Allow),
        EventKind::Update => return None,
        EventKind::End(r) => (Phase::End(end_reason(r)), Verdict::Allow),
        EventKind::Denied(DropReason::PolicyReject) => (Phase::Start, Verdict::Reject),
        EventKind::Denied(_) => (Phase::Start, Verdict::Deny),
    };
    Some(build(event, phase, verdict, host, engine, identities, clock))
}

/// A periodic update record for a live connection (its counts so far).
pub fn update_record(
    event: &FlowEvent,
    host: &str,
    engine: &Engine,
    identities: &Identities,
    clock: Clock,
) -> FlowRecord {
    build(event, Phase::Update, Verdict::Allow, host, engine, identities, clock)
}

fn build(
    event: &FlowEvent,
    phase: Phase,
    verdict: Verdict,
    host: &str,
    engine: &Engine,
    identities: &Identities,
    clock: Clock,
) -> FlowRecord {
    let key = &event.key;
    let endpoint = |addr: IpAddr, port: u16| Endpoint {
        addr: canonical_ip(addr),
        port,
        vm: identities.of(addr).cloned(),
    };
    let decided_by = decisions(engine, &event.rules, event.policy_version);
    FlowRecord {
        appliance: event
            .steer
            .as_ref()
            .and_then(|s| engine.appliances_of(s))
            .map(|(c, vms)| format!("{c}/{}", vms.join(","))),
        time_ns: clock.unix(event.now),
        flow_id: flow_id(event),
        host: host.to_string(),
        phase,
        src: endpoint(key.src_addr(), key.src_port),
        dst: endpoint(key.dst_addr(), key.dst_port),
        protocol: key.protocol.0,
        icmp: icmp_message(key),
        verdict,
        decided_by,
        packets_out: event.packets - event.reply_packets.min(event.packets),
        bytes_out: event.bytes - event.reply_bytes.min(event.bytes),
        packets_in: event.reply_packets,
        bytes_in: event.reply_bytes,
        start_ns: clock.unix(event.created),
        last_ns: clock.unix(event.last_seen),
    }
}

/// The rules (registry indices: egress, ingress) that decided a flow, by id and level.
pub fn decisions(engine: &Engine, rules: &[Option<u32>; 2], policy_version: u64) -> Vec<Decision> {
    rules
        .iter()
        .zip(["egress", "ingress"])
        .filter_map(|(r, chain)| {
            let info = engine.rule_info((*r)?)?;
            Some(Decision {
                rule: info.rule.to_string(),
                level: info.level.to_string(),
                policy_version,
                chain: chain.to_string(),
            })
        })
        .collect()
}

/// The ICMP message a key was made from: ICMP over IPv4 and ICMPv6 over
/// IPv6 (the only ones whose type the key holds).
fn icmp_message(key: &FlowKey) -> Option<IcmpMessage> {
    match (key.protocol, key.is_ipv4()) {
        (IpProtocol::ICMP, true) | (IpProtocol::ICMPV6, false) => Some(IcmpMessage {
            ty: key.icmp_type,
            code: key.icmp_code,
        }),
        _ => None,
    }
}

/// All records of one connection share an id: its key's hash and its start time.
fn flow_id(event: &FlowEvent) -> u64 {
    flow_id_of(&event.key, event.created)
}

/// The flow id of the connection keyed `key` (either direction) created at
/// engine time `created`: what its flow records and alerts share.
pub fn flow_id_of(key: &FlowKey, created: u64) -> u64 {
    key.symmetric_hash() ^ created.rotate_left(32)
}

fn end_reason(r: EndReason) -> record::EndReason {
    match r {
        EndReason::Closed => record::EndReason::Fin,
        EndReason::Reset => record::EndReason::Rst,
        EndReason::Timeout => record::EndReason::Timeout,
        EndReason::PolicyRevoked => record::EndReason::PolicyRevoked,
        EndReason::Evicted => record::EndReason::Evicted,
        EndReason::Exported => record::EndReason::Migrated,
        EndReason::Inspection => record::EndReason::Inspection,
    }
}

//! The records of the trail: flows (who talked to whom, what decided it) and
//! changes (who changed what).
//!
//! A record is self-contained: it names both ends by identity as known when
//! the flow was decided (VM name, uuid, tags, zone, cluster, host), so a query
//! a year later does not depend on today's inventory.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// One end of a flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// The address.
    pub addr: IpAddr,
    /// The transport port (0 when the protocol has none; the ICMP identifier for echo).
    pub port: u16,
    /// The managed VM behind the address; `None` for an external address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmIdentity>,
}

/// A managed VM's identity at the time of the flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmIdentity {
    /// VM name.
    pub name: String,
    /// VM uuid.
    pub uuid: String,
    /// The vNIC.
    pub vnic: String,
    /// The vNIC's zone.
    pub zone: String,
    /// The VM's cluster, if declared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// The host it ran on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Its tags.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

/// The verdict on a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Forwarded.
    Allow,
    /// Dropped silently.
    Deny,
    /// Dropped with a TCP reset or ICMP prohibited.
    Reject,
}

/// Why a flow ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// FIN handshake.
    Fin,
    /// TCP reset.
    Rst,
    /// Idle timeout.
    Timeout,
    /// A policy change revoked it.
    PolicyRevoked,
    /// Evicted from a full table.
    Evicted,
    /// Moved to another host (live migration).
    Migrated,
    /// The agent stopped while it was open.
    Shutdown,
    /// Inline inspection dropped it (a signature's `drop` or `reject`).
    Inspection,
}

/// Which record of a flow's life this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "phase", content = "reason")]
pub enum Phase {
    /// The first packet was decided (allowed flows start; denied flows have only this record).
    Start,
    /// Periodic update of a long-lived flow.
    Update,
    /// The flow ended.
    End(EndReason),
}

/// Which policy rule decided a flow, and where it sits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Rule id (`default` when a zone or datacenter default applied).
    pub rule: String,
    /// `datacenter`, `cluster`, `zone` or `vm`.
    pub level: String,
    /// Policy version.
    pub policy_version: u64,
    /// Which chain: `egress` (the source's) or `ingress` (the destination's).
    pub chain: String,
}

/// The ICMP (or ICMPv6) message that started a flow: its type and code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IcmpMessage {
    /// The message type (ICMP 8 echo request, 0 echo reply, 3 unreachable, …;
    /// ICMPv6 128 echo request, 129 echo reply, 1 unreachable, …).
    #[serde(rename = "type")]
    pub ty: u8,
    /// The message code.
    pub code: u8,
}

/// One flow record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// When the record was made (Unix time, nanoseconds).
    pub time_ns: u64,
    /// Identifies the flow on its host: all records of one flow share it.
    pub flow_id: u64,
    /// The host (agent) that recorded it.
    pub host: String,
    /// Start, update or end.
    #[serde(flatten)]
    pub phase: Phase,
    /// The initiator.
    pub src: Endpoint,
    /// The responder.
    pub dst: Endpoint,
    /// IP protocol number.
    pub protocol: u8,
    /// For ICMP over IPv4 and ICMPv6 over IPv6: the type and code of the
    /// message the flow was decided on (an echo request and its reply carry
    /// the same identifier in both ports: only the type tells them apart).
    /// `None` for other protocols, and in records written before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp: Option<IcmpMessage>,
    /// The verdict.
    pub verdict: Verdict,
    /// The deciding rule(s): the chain that denied, or both chains that allowed.
    pub decided_by: Vec<Decision>,
    /// Packets initiator → responder so far.
    pub packets_out: u64,
    /// Bytes initiator → responder so far.
    pub bytes_out: u64,
    /// Packets responder → initiator so far.
    pub packets_in: u64,
    /// Bytes responder → initiator so far.
    pub bytes_in: u64,
    /// When the flow's first packet was seen (Unix time, nanoseconds).
    pub start_ns: u64,
    /// When its last packet was seen (Unix time, nanoseconds).
    pub last_ns: u64,
    /// The service-chain appliance the flow was steered through, as
    /// `CHAIN/VM`; `None` for a flow no rule redirects (and in records
    /// written before it was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub appliance: Option<String>,
}

/// One change to inventory or policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeRecord {
    /// When (Unix time, nanoseconds).
    pub time_ns: u64,
    /// The authenticated identity that made it (token name, certificate subject, `local` for files).
    pub actor: String,
    /// What was done (`policy.apply`, `policy.rollback`, `vm.tag`, …).
    pub action: String,
    /// The resource changed (`policy`, `vm/web-1`, …).
    pub resource: String,
    /// The change, as a unified diff or a short description.
    pub diff: String,
    /// The policy version it produced, when it produced one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<u64>,
}

/// Any record of the trail.
// Flow records are the common case by far; boxing them would add an
// allocation per record to make the rare change record smaller.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Record {
    /// A flow record.
    Flow(FlowRecord),
    /// A change record.
    Change(ChangeRecord),
}

impl Record {
    /// When the record was made (Unix time, nanoseconds).
    pub fn time_ns(&self) -> u64 {
        match self {
            Record::Flow(f) => f.time_ns,
            Record::Change(c) => c.time_ns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> FlowRecord {
        FlowRecord {
            appliance: None,
            time_ns: 1_700_000_000_000_000_000,
            flow_id: 7,
            host: "hv1".into(),
            phase: Phase::End(EndReason::Fin),
            src: Endpoint {
                addr: "10.0.1.11".parse().unwrap(),
                port: 40000,
                vm: Some(VmIdentity {
                    name: "web-1".into(),
                    uuid: "u".into(),
                    vnic: "web-1.0".into(),
                    zone: "web".into(),
                    cluster: Some("prod".into()),
                    host: Some("hv1".into()),
                    tags: [("tier".to_string(), "web".to_string())].into(),
                }),
            },
            dst: Endpoint {
                addr: "203.0.113.10".parse().unwrap(),
                port: 443,
                vm: None,
            },
            protocol: 6,
            icmp: None,
            verdict: Verdict::Allow,
            decided_by: vec![Decision {
                rule: "web-out".into(),
                level: "zone".into(),
                policy_version: 3,
                chain: "egress".into(),
            }],
            packets_out: 10,
            bytes_out: 1000,
            packets_in: 8,
            bytes_in: 9000,
            start_ns: 1,
            last_ns: 2,
        }
    }

    #[test]
    fn records_round_trip_through_json() {
        for r in [
            Record::Flow(sample()),
            Record::Change(ChangeRecord {
                time_ns: 5,
                actor: "alice".into(),
                action: "vm.tag".into(),
                resource: "vm/web-1".into(),
                diff: "+quarantine=true".into(),
                policy_version: None,
            }),
        ] {
            let text = serde_json::to_string(&r).unwrap();
            let back: Record = serde_json::from_str(&text).unwrap();
            assert_eq!(back, r, "{text}");
        }
    }

    /// An ICMP record keeps its message's type and code through JSON; a
    /// record without them (another protocol, or one written before they
    /// were kept) has no `icmp` key and reads back as `None`.
    #[test]
    fn icmp_type_and_code_round_trip_and_are_optional() {
        let mut echo_reply = sample();
        echo_reply.protocol = 1;
        echo_reply.src.port = 0x1234;
        echo_reply.dst.port = 0x1234;
        echo_reply.icmp = Some(IcmpMessage { ty: 0, code: 0 });
        let text = serde_json::to_string(&Record::Flow(echo_reply.clone())).unwrap();
        assert!(text.contains(r#""icmp":{"type":0,"code":0}"#), "{text}");
        let back: Record = serde_json::from_str(&text).unwrap();
        assert_eq!(back, Record::Flow(echo_reply), "{text}");

        let tcp = serde_json::to_string(&Record::Flow(sample())).unwrap();
        assert!(!tcp.contains("icmp"), "{tcp}");
        let old = tcp.replace(r#""protocol":6"#, r#""protocol":1"#);
        let Record::Flow(f) = serde_json::from_str::<Record>(&old).unwrap() else {
            panic!("{old}")
        };
        assert_eq!((f.protocol, f.icmp), (1, None));
    }

    #[test]
    fn phase_is_flat_in_json() {
        let text = serde_json::to_string(&Record::Flow(sample())).unwrap();
        assert!(text.contains(r#""kind":"flow""#), "{text}");
        assert!(text.contains(r#""phase":"end","reason":"fin""#), "{text}");
    }
}

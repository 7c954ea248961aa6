//! The records of the trail: flows (who talked to whom, what decided it),
//! changes (who changed what) and inline inspection's alerts (which signature
//! matched which flow, and what was done).
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
    /// The service-chain appliances the flow was steered through, as
    /// `CHAIN/VM` (one stage) or `CHAIN/VM1,VM2,...` (the appliance of each
    /// stage, in the initiator's order); `None` for a flow no rule
    /// redirects (and in records written before it was kept).
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

/// One alert of inline inspection: a signature matched a flow's traffic.
/// Field names follow Suricata's EVE `alert` records (`timestamp`,
/// `flow_id`, `src_ip`, `dest_ip`, `proto`, `alert.signature_id`, …) so
/// tools that read EVE read these; `src`/`dest` are the managed VMs behind
/// the addresses, as flow records name them, as known when it was raised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertRecord {
    /// RFC 3339, UTC.
    pub timestamp: String,
    /// Unix time, nanoseconds (of the first hit when `count` > 1).
    pub time_ns: u64,
    /// The host whose agent raised it.
    pub host: String,
    /// The flow's id on its host: the same as its flow records' `flow_id`
    /// (0 when the connection was no longer tracked).
    #[serde(default)]
    pub flow_id: u64,
    /// `TCP`, `UDP`, `ICMP`, `IPv6-ICMP` or the protocol number.
    pub proto: String,
    /// Source of the data that matched.
    pub src_ip: IpAddr,
    /// Its port (0 without ports).
    pub src_port: u16,
    /// Destination of the data that matched.
    pub dest_ip: IpAddr,
    /// Its port.
    pub dest_port: u16,
    /// The signature and what was done.
    pub alert: AlertInfo,
    /// The inspection profile the policy chose for the flow.
    pub profile: String,
    /// The policy rules that allowed the flow (egress, ingress): the
    /// profile is the first of them that names one, else the traffic
    /// class's default (`inspection_defaults`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub decided_by: Vec<Decision>,
    /// The managed VM behind `src_ip` (`None`: external).
    pub src: Option<VmIdentity>,
    /// The managed VM behind `dest_ip`.
    pub dest: Option<VmIdentity>,
    /// How many hits of this signature on this flow the record stands for:
    /// repeated `alert`-only hits are coalesced (1 for a single hit; a
    /// `drop` or `reject` is never coalesced).
    #[serde(default = "one")]
    pub count: u64,
    /// When the last hit coalesced into this record came (Unix ns; `time_ns` when `count` is 1).
    #[serde(default)]
    pub last_ns: u64,
}

fn one() -> u64 {
    1
}

/// The `alert` object of an [`AlertRecord`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertInfo {
    /// `allowed` (the packet went on) or `blocked`.
    pub action: String,
    /// The signature's action: `alert`, `drop`, `reject` or `pass`.
    pub rule_action: String,
    /// sid.
    pub signature_id: u32,
    /// rev.
    pub rev: u32,
    /// msg.
    pub signature: String,
    /// The classtype's description, if any.
    pub category: Option<String>,
    /// Priority (1 most severe).
    pub severity: u8,
}

impl AlertRecord {
    /// Whether the packet was blocked (a `drop` or `reject` signature).
    pub fn blocked(&self) -> bool {
        self.alert.action == "blocked"
    }

    /// Whether `vm` is the VM at either end.
    pub fn names_vm(&self, vm: &str) -> bool {
        [&self.src, &self.dest].into_iter().flatten().any(|i| i.name == vm)
    }
}

/// Alerts a host raised but did not record one by one (an attacker can
/// raise alerts at line rate; the bound on what is kept sheds the excess):
/// never silent, this record says how many and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertsNotRecorded {
    /// When the record was made (Unix time, nanoseconds).
    pub time_ns: u64,
    /// The host.
    pub host: String,
    /// Alerts not recorded since the last such record.
    pub count: u64,
    /// Of them, `drop`/`reject` alerts (past the hard bound kept for them).
    pub blocked: u64,
    /// The window they were shed in: from (Unix ns).
    pub since_ns: u64,
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
    /// An alert of inline inspection.
    Alert(AlertRecord),
    /// How many alerts were shed, not recorded one by one.
    AlertsNotRecorded(AlertsNotRecorded),
}

impl Record {
    /// When the record was made (Unix time, nanoseconds).
    pub fn time_ns(&self) -> u64 {
        match self {
            Record::Flow(f) => f.time_ns,
            Record::Change(c) => c.time_ns,
            Record::Alert(a) => a.time_ns,
            Record::AlertsNotRecorded(n) => n.time_ns,
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

    fn sample_alert() -> AlertRecord {
        AlertRecord {
            timestamp: "2023-11-14T22:13:20.000Z".into(),
            time_ns: 1_700_000_000_000_000_000,
            host: "hv1".into(),
            flow_id: 42,
            proto: "TCP".into(),
            src_ip: "203.0.113.10".parse().unwrap(),
            src_port: 40000,
            dest_ip: "10.0.1.11".parse().unwrap(),
            dest_port: 80,
            alert: AlertInfo {
                action: "blocked".into(),
                rule_action: "drop".into(),
                signature_id: 9000001,
                rev: 2,
                signature: "marker".into(),
                category: Some("Attempted Administrator Privilege Gain".into()),
                severity: 1,
            },
            profile: "full".into(),
            decided_by: sample().decided_by,
            src: None,
            dest: sample().src.vm,
            count: 1,
            last_ns: 1_700_000_000_000_000_000,
        }
    }

    /// Alert records keep EVE's field names beside the trail's `kind`, read
    /// back equal, and one written without the fields added later (flow id,
    /// rules, count) reads with their defaults.
    #[test]
    fn alert_records_round_trip_in_eve_names() {
        let a = sample_alert();
        let text = serde_json::to_string(&Record::Alert(a.clone())).unwrap();
        for key in [
            r#""kind":"alert""#,
            r#""src_ip":"203.0.113.10""#,
            r#""dest_port":80"#,
            r#""signature_id":9000001"#,
            r#""flow_id":42"#,
        ] {
            assert!(text.contains(key), "{key} in {text}");
        }
        let back: Record = serde_json::from_str(&text).unwrap();
        assert_eq!(back, Record::Alert(a.clone()));
        let mut old: serde_json::Value = serde_json::from_str(&text).unwrap();
        for k in ["flow_id", "decided_by", "count", "last_ns"] {
            old.as_object_mut().unwrap().remove(k);
        }
        let Record::Alert(o) = serde_json::from_value(old).unwrap() else {
            panic!("not an alert")
        };
        assert_eq!((o.flow_id, o.count, o.last_ns, o.decided_by.len()), (0, 1, 0, 0));
        let gap = Record::AlertsNotRecorded(AlertsNotRecorded {
            time_ns: 5,
            host: "hv1".into(),
            count: 1234,
            blocked: 3,
            since_ns: 1,
        });
        let text = serde_json::to_string(&gap).unwrap();
        assert!(text.contains(r#""kind":"alerts_not_recorded""#), "{text}");
        assert_eq!(serde_json::from_str::<Record>(&text).unwrap(), gap);
        assert_eq!(gap.time_ns(), 5);
    }

    #[test]
    fn phase_is_flat_in_json() {
        let text = serde_json::to_string(&Record::Flow(sample())).unwrap();
        assert!(text.contains(r#""kind":"flow""#), "{text}");
        assert!(text.contains(r#""phase":"end","reason":"fin""#), "{text}");
    }
}

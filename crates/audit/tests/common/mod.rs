//! Shared helpers of the audit store tests: synthetic records.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use palisade_audit::record::*;

/// A temporary trail directory `<tmp>/trail`: the default key file, kept
/// beside the trail (`<tmp>/trail.key`), goes away with it.
pub struct TrailDir {
    _tmp: tempfile::TempDir,
    path: PathBuf,
}

impl TrailDir {
    /// A new, empty trail directory.
    pub fn new() -> TrailDir {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("trail");
        std::fs::create_dir(&path).unwrap();
        TrailDir { _tmp: tmp, path }
    }

    /// The trail directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Base time of synthetic records (2023-11-14T22:13:20Z).
pub const T0: u64 = 1_700_000_000_000_000_000;
/// One second in nanoseconds.
pub const SEC: u64 = 1_000_000_000;

/// The `i`th synthetic record: mostly flows among 7 VMs in 3 zones, with
/// varied verdicts and rules, one change record in 10; one second apart.
pub fn rec(i: u64) -> Record {
    let time_ns = T0 + i * SEC;
    if i % 10 == 9 {
        return Record::Change(ChangeRecord {
            time_ns,
            actor: "alice".into(),
            action: "vm.tag".into(),
            resource: format!("vm/vm-{}", i % 7),
            diff: format!("+n={i}"),
            policy_version: Some(i),
        });
    }
    let zone = |v: u64| ["web", "app", "db"][(v % 3) as usize].to_string();
    let vm = |v: u64| VmIdentity {
        name: format!("vm-{v}"),
        uuid: format!("u-{v}"),
        vnic: format!("vm-{v}.0"),
        zone: zone(v),
        cluster: None,
        host: Some("hv1".into()),
        tags: Default::default(),
    };
    let (s, d) = (i % 7, (i * 3 + 1) % 7);
    let verdict = [Verdict::Allow, Verdict::Allow, Verdict::Deny, Verdict::Reject][(i % 4) as usize];
    Record::Flow(FlowRecord {
        appliance: None,
        time_ns,
        flow_id: i,
        host: "hv1".into(),
        phase: Phase::Start,
        src: Endpoint {
            addr: format!("10.0.0.{}", s + 1).parse().unwrap(),
            port: 40000 + (i % 1000) as u16,
            vm: Some(vm(s)),
        },
        dst: Endpoint {
            addr: if i % 5 == 0 {
                "203.0.113.9".parse().unwrap()
            } else {
                format!("10.0.0.{}", d + 1).parse().unwrap()
            },
            port: 443,
            vm: (i % 5 != 0).then(|| vm(d)),
        },
        protocol: 6,
        icmp: None,
        verdict,
        decided_by: vec![Decision {
            rule: format!("rule-{}", i % 5),
            level: "zone".into(),
            policy_version: 1,
            chain: "egress".into(),
        }],
        packets_out: i,
        bytes_out: i * 100,
        packets_in: 0,
        bytes_in: 0,
        start_ns: time_ns,
        last_ns: time_ns,
    })
}

/// Records `from..to`.
pub fn recs(from: u64, to: u64) -> Vec<Record> {
    (from..to).map(rec).collect()
}

/// The `i`th synthetic alert record (`drop` on every third), or, for `i`
/// a multiple of 11, a record of alerts not recorded.
pub fn alert(i: u64) -> Record {
    let time_ns = T0 + i * SEC;
    if i % 11 == 0 {
        return Record::AlertsNotRecorded(AlertsNotRecorded {
            time_ns,
            host: "hv1".into(),
            count: i,
            blocked: i / 2,
            since_ns: time_ns - SEC,
        });
    }
    let v = i % 7;
    let blocked = i % 3 == 0;
    Record::Alert(AlertRecord {
        timestamp: palisade_audit::time::format_rfc3339(time_ns),
        time_ns,
        host: "hv1".into(),
        flow_id: i,
        proto: "TCP".into(),
        src_ip: "203.0.113.9".parse().unwrap(),
        src_port: 40000,
        dest_ip: format!("10.0.0.{}", v + 1).parse().unwrap(),
        dest_port: 80,
        alert: AlertInfo {
            action: if blocked { "blocked" } else { "allowed" }.into(),
            rule_action: if blocked { "drop" } else { "alert" }.into(),
            signature_id: 1000 + (i % 4) as u32,
            rev: 1,
            signature: format!("sig {}", i % 4),
            category: None,
            severity: 1,
        },
        profile: "full".into(),
        decided_by: vec![Decision {
            rule: format!("rule-{}", i % 5),
            level: "zone".into(),
            policy_version: 1,
            chain: "ingress".into(),
        }],
        src: None,
        dest: Some(VmIdentity {
            name: format!("vm-{v}"),
            uuid: format!("u-{v}"),
            vnic: format!("vm-{v}.0"),
            zone: ["web", "app", "db"][(v % 3) as usize].to_string(),
            cluster: None,
            host: Some("hv1".into()),
            tags: Default::default(),
        }),
        count: 1 + i % 2,
        last_ns: time_ns,
    })
}

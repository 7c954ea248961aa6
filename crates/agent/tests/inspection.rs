//! Inline inspection as a worker runs it: the engine decides a frame and
//! hands its flow's profile, the worker's [`Inline`] inspects it with the
//! signatures that profile selects, and a drop becomes the flow's verdict in
//! the engine.

use core::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;

use palisade_agent::inspection::{Inline, InlineSetup, InlineVerdict, Signatures, profile_spec};
use palisade_agent::records::{Clock, Identities};
use palisade_datapath::port::{self, PortId, UplinkConfig};
use palisade_datapath::{Disposition, DropReason, Engine, EngineConfig, FlowEvent, PolicyLookup, Results};
use palisade_inspect::classification::Classifications;
use palisade_policy::compile::Compiler;
use palisade_policy::model::{Model, Profile};
use palisade_policy::{MemorySource, load};
use palisade_testkit::engine::tcp_v4_frame;
use palisade_wire::ethernet::EthernetAddress;
use palisade_wire::tcp::TcpFlags;
use palisade_wire::virtio_net::{Gso, GsoKind, Offload, PartialChecksum};

const POLICY: &str = r#"
version: 1
datacenter: { name: dc1, default: deny }
zones: [{ name: web, vlan: 100 }]
vms:
  - { name: a, uuid: 00000000-0000-4000-8000-00000000000a, host: h1, tags: { tier: web }, vnics: [{ name: a.0, mac: "02:00:00:00:00:0a", ips: [10.0.0.10], zone: web }] }
  - { name: b, uuid: 00000000-0000-4000-8000-00000000000b, host: h1, vnics: [{ name: b.0, mac: "02:00:00:00:00:0b", ips: [10.0.0.11], zone: web }] }
groups: { web: { zone: web } }
profiles:
  full: { signatures: [all] }
  critical: { signatures: [critical] }
  none: { signatures: [] }
inspection_defaults: { intra_zone: none }
rules:
  datacenter:
    - { id: full-8080, from: web, to: web, service: tcp/8080, action: allow, inspect: full }
    - { id: crit-9000, from: web, to: web, service: tcp/9000, action: allow, inspect: critical }
    - { id: plain-80, from: web, to: web, service: tcp/80, action: allow }
"#;

/// sid 1: a drop rule of priority 3 (not critical); sid 2: an alert of
/// priority 1 (critical); sid 3: reject.
const RULES: &str = r#"
drop tcp any any -> any any (msg:"marker seen"; flow:to_server,established; content:"evil-7f3a"; priority:3; sid:1; rev:2;)
alert tcp any any -> any any (msg:"critical marker"; flow:to_server,established; content:"crit-91b0"; priority:1; sid:2; rev:1;)
reject tcp any any -> any any (msg:"reject marker"; flow:to_server,established; content:"nope-55c1"; priority:1; sid:3; rev:1;)
"#;

const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);
const MS: u64 = 1_000_000;

struct World {
    model: Model,
    engine: Engine,
    inline: Inline,
    identities: Identities,
    events: Vec<FlowEvent>,
    now: u64,
}

fn world(budget: Option<u64>, closed: bool) -> World {
    world_bounded(budget, closed, None)
}

fn world_bounded(budget: Option<u64>, closed: bool, alert_bounds: Option<(usize, usize)>) -> World {
    let loaded = load(&MemorySource::new().with("p.yaml", POLICY.to_string())).unwrap();
    assert!(!loaded.has_errors(), "{}", loaded.render());
    let model = loaded.model.clone();
    let sigs = Signatures::compile(
        RULES,
        Path::new("test.rules"),
        Classifications::default(),
        false,
        &model,
    )
    .unwrap();
    assert_eq!(sigs.len(), 3);
    let compiler = Compiler::new(loaded.model).unwrap();
    let mut engine = Engine::new(
        EngineConfig::new(UplinkConfig {
            local_mac: EthernetAddress([0x0e, 0, 0, 0, 0, 1]),
            local_ip: Ipv4Addr::new(192, 168, 0, 1),
            gateway_mac: EthernetAddress([0x0e, 0, 0, 0, 0, 0xfe]),
            flood: vec![],
        }),
        Box::new(PolicyLookup::new(compiler)),
    );
    for nic in ["a.0", "b.0"] {
        engine
            .add_vnic(port::vnic_from_model(&model, nic, &[], 1000).unwrap())
            .unwrap();
    }
    let setup = InlineSetup {
        signatures: Arc::new(sigs),
        budget_bytes_per_s: budget,
        stream_memory: 16 << 20,
        max_flows: 1024,
        fail_closed: vec![closed; 3].into(),
        host: "h1".into(),
        clock: Clock { unix_at_zero: 0 },
    };
    World {
        identities: Identities::new(&model),
        model,
        engine,
        inline: match alert_bounds {
            Some((alerts, blocked)) => Inline::new(setup).with_alert_bounds(alerts, blocked),
            None => Inline::new(setup),
        },
        events: Vec::new(),
        now: 0,
    }
}

fn tcp_frame(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), seq: u32, ack: u32, flags: TcpFlags, data: &[u8]) -> Vec<u8> {
    let end = |(ip, port): (Ipv4Addr, u16)| ([2, 0, 0, 0, 0, ip.octets()[3]], ip, port);
    tcp_v4_frame(end(src), end(dst), (seq, ack), flags, data)
}

/// What the worker does with a frame: the engine's disposition, then (for
/// a forwarded frame of an inspected flow) inline inspection's verdict.
#[derive(Debug, PartialEq, Eq)]
enum Fate {
    Dropped(DropReason),
    Forwarded { inspected: bool, verdict: InlineVerdict },
}

impl World {
    fn send(&mut self, from: Ipv4Addr, frame: &[u8], offload: Offload) -> Fate {
        self.now += MS;
        let name = if from == A { "a.0" } else { "b.0" };
        let port: PortId = self.engine.port_of(name).unwrap();
        let mut results = Results::new();
        let p = self
            .engine
            .process_offloaded(self.now, port, frame, offload, &mut self.events, &mut results);
        match p.disposition {
            Disposition::Drop(r) => Fate::Dropped(r),
            Disposition::Forward => {
                let inspected = p.inspection().is_some();
                let verdict = if inspected {
                    self.inline
                        .frame(&mut self.engine, &p, port, self.now, &self.identities, &mut self.events)
                } else {
                    InlineVerdict::Forward
                };
                Fate::Forwarded { inspected, verdict }
            }
        }
    }

    /// A connection a→b:`port` with its handshake; returns the next client and server sequence numbers.
    fn open(&mut self, port: u16) -> (u32, u32) {
        self.open_from(40000, port)
    }

    /// A connection a:`cport`→b:`port` with its handshake.
    fn open_from(&mut self, cport: u16, port: u16) -> (u32, u32) {
        let (c, s) = ((A, cport), (B, port));
        for (from, frame) in [
            (A, tcp_frame(c, s, 1000, 0, TcpFlags::SYN, &[])),
            (B, tcp_frame(s, c, 5000, 1001, TcpFlags::SYN | TcpFlags::ACK, &[])),
            (A, tcp_frame(c, s, 1001, 5001, TcpFlags::ACK, &[])),
        ] {
            assert!(matches!(self.send(from, &frame, Offload::NONE), Fate::Forwarded { .. }));
        }
        (1001, 5001)
    }
}

const PASS: Fate = Fate::Forwarded {
    inspected: true,
    verdict: InlineVerdict::Forward,
};

#[test]
fn a_drop_signature_drops_the_flow_inline_and_names_both_ends() {
    let mut w = world(None, false);
    let (seq, ack) = w.open(8080);
    let (c, s) = ((A, 40000), (B, 8080));
    let clean = b"GET /index.html HTTP/1.1\r\nHost: b\r\n\r\n";
    assert_eq!(
        w.send(
            A,
            &tcp_frame(c, s, seq, ack, TcpFlags::ACK | TcpFlags::PSH, clean),
            Offload::NONE
        ),
        PASS
    );
    let seq = seq + clean.len() as u32;
    let evil = b"GET /?q=evil-7f3a HTTP/1.1\r\n\r\n";
    assert_eq!(
        w.send(
            A,
            &tcp_frame(c, s, seq, ack, TcpFlags::ACK | TcpFlags::PSH, evil),
            Offload::NONE
        ),
        Fate::Forwarded {
            inspected: true,
            verdict: InlineVerdict::Drop
        }
    );
    // Every later packet of the flow, both ways, is dropped by the engine (not inspected again).
    let before = w.inline.counters().packets;
    let later = tcp_frame(c, s, seq, ack, TcpFlags::ACK | TcpFlags::PSH, evil);
    assert_eq!(w.send(A, &later, Offload::NONE), Fate::Dropped(DropReason::Inspection));
    let back = tcp_frame(s, c, ack, seq, TcpFlags::ACK, b"HTTP/1.1 200 OK\r\n\r\n");
    assert_eq!(w.send(B, &back, Offload::NONE), Fate::Dropped(DropReason::Inspection));
    assert_eq!(w.inline.counters().packets, before, "not inspected again");
    assert_eq!(w.engine.counters().dropped(DropReason::Inspection), 3);
    assert_eq!(w.inline.counters().drops, 1);

    let alerts = w.inline.take_records().records;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    let a = &alerts[0];
    assert_eq!((a.alert.signature_id, a.alert.rev), (1, 2));
    assert_eq!(a.alert.signature, "marker seen");
    assert_eq!(
        (a.alert.action.as_str(), a.alert.rule_action.as_str()),
        ("blocked", "drop")
    );
    assert_eq!(a.profile, "full");
    assert_eq!(
        (a.src_ip, a.src_port, a.dest_ip, a.dest_port),
        (IpAddr::V4(A), 40000, IpAddr::V4(B), 8080)
    );
    let (src, dest) = (a.src.as_ref().unwrap(), a.dest.as_ref().unwrap());
    assert_eq!(
        (src.name.as_str(), src.vnic.as_str(), src.zone.as_str()),
        ("a", "a.0", "web")
    );
    assert_eq!(src.tags.get("tier").map(String::as_str), Some("web"));
    assert_eq!((dest.name.as_str(), dest.vnic.as_str()), ("b", "b.0"));
    assert_eq!(a.proto, "TCP");
    let json = serde_json::to_value(a).unwrap();
    assert_eq!(json["alert"]["signature_id"], 1, "EVE's field names: {json}");
    assert_eq!(json["dest_ip"], "10.0.0.11");
    // The alert names its flow as the flow's records do, and the rule that chose its profile.
    let end = w
        .events
        .iter()
        .find(|e| {
            matches!(
                e.kind,
                palisade_datapath::EventKind::End(palisade_datapath::EndReason::Inspection)
            )
        })
        .expect("the flow ended by inspection");
    assert_ne!(a.flow_id, 0);
    assert_eq!(a.flow_id, palisade_agent::records::flow_id_of(&end.key, end.created));
    let rules: Vec<(&str, &str)> = a
        .decided_by
        .iter()
        .map(|d| (d.chain.as_str(), d.rule.as_str()))
        .collect();
    assert_eq!(rules, [("egress", "full-8080"), ("ingress", "full-8080")]);
    assert_eq!(a.count, 1);
}

#[test]
fn the_same_payload_under_critical_passes_without_an_alert_and_critical_signatures_still_fire() {
    let mut w = world(None, false);
    let (seq, ack) = w.open(9000);
    let (c, s) = ((A, 40000), (B, 9000));
    let evil = b"GET /?q=evil-7f3a HTTP/1.1\r\n\r\n";
    assert_eq!(
        w.send(
            A,
            &tcp_frame(c, s, seq, ack, TcpFlags::ACK | TcpFlags::PSH, evil),
            Offload::NONE
        ),
        PASS
    );
    assert!(w.inline.take_records().records.is_empty(), "sid 1 is not critical");
    let seq = seq + evil.len() as u32;
    let crit = b"crit-91b0";
    assert_eq!(
        w.send(
            A,
            &tcp_frame(c, s, seq, ack, TcpFlags::ACK | TcpFlags::PSH, crit),
            Offload::NONE
        ),
        Fate::Forwarded {
            inspected: true,
            verdict: InlineVerdict::Forward
        },
        "an alert passes"
    );
    let alerts = w.inline.take_records().records;
    assert_eq!(alerts.iter().map(|a| a.alert.signature_id).collect::<Vec<_>>(), [2]);
    assert_eq!(
        (alerts[0].alert.action.as_str(), alerts[0].profile.as_str()),
        ("allowed", "critical")
    );
}

#[test]
fn a_flow_without_a_profile_is_not_inspected() {
    let mut w = world(None, false);
    let (seq, ack) = w.open(80);
    let evil = b"evil-7f3a";
    assert_eq!(
        w.send(
            A,
            &tcp_frame((A, 40000), (B, 80), seq, ack, TcpFlags::ACK, evil),
            Offload::NONE
        ),
        Fate::Forwarded {
            inspected: false,
            verdict: InlineVerdict::Forward
        }
    );
    assert_eq!(w.inline.counters().packets, 0);
}

#[test]
fn a_reject_signature_rejects() {
    let mut w = world(None, false);
    let (seq, ack) = w.open(8080);
    let frame = tcp_frame(
        (A, 40000),
        (B, 8080),
        seq,
        ack,
        TcpFlags::ACK | TcpFlags::PSH,
        b"nope-55c1",
    );
    assert_eq!(
        w.send(A, &frame, Offload::NONE),
        Fate::Forwarded {
            inspected: true,
            verdict: InlineVerdict::Reject
        }
    );
    assert_eq!(w.inline.counters().rejects, 1);
    assert_eq!(w.engine.counters().dropped(DropReason::Inspection), 1);
}

/// A TSO super-frame is inspected whole: a marker that a 1448-byte
/// segmentation would cut in two is still found, and the frame dropped.
#[test]
fn a_super_frame_is_inspected_whole() {
    let mut w = world(None, false);
    let (seq, ack) = w.open(8080);
    let mut data = vec![b'x'; 4000];
    data[1444..1453].copy_from_slice(b"evil-7f3a");
    let frame = tcp_frame((A, 40000), (B, 8080), seq, ack, TcpFlags::ACK | TcpFlags::PSH, &data);
    let offload = Offload {
        csum: Some(PartialChecksum { start: 34, offset: 16 }),
        csum_valid: false,
        gso: Some(Gso {
            kind: GsoKind::TcpV4,
            ecn: false,
            size: 1448,
            header_len: 54,
        }),
    };
    assert_eq!(
        w.send(A, &frame, offload),
        Fate::Forwarded {
            inspected: true,
            verdict: InlineVerdict::Drop
        }
    );
    assert_eq!(
        w.engine.counters().dropped(DropReason::Inspection),
        1,
        "one frame (its segments are counted as one here)"
    );
}

#[test]
fn over_budget_a_closed_zone_drops_and_an_open_zone_bypasses() {
    for closed in [false, true] {
        // 200 bytes a second: the handshake (3 x 54 bytes) is inspected, the 2054-byte frame is over.
        let mut w = world(Some(200), closed);
        let (seq, ack) = w.open(8080);
        let big = tcp_frame((A, 40000), (B, 8080), seq, ack, TcpFlags::ACK, &[b'y'; 2000]);
        let got = w.send(A, &big, Offload::NONE);
        let c = w.inline.counters();
        if closed {
            assert_eq!(
                got,
                Fate::Forwarded {
                    inspected: true,
                    verdict: InlineVerdict::Drop
                }
            );
            assert_eq!((c.budget_drops, c.bypassed), (1, 0));
            assert_eq!(w.engine.counters().dropped(DropReason::Inspection), 1);
            assert_eq!(w.engine.conntrack().len(), 1, "the flow itself stays");
        } else {
            assert_eq!(got, PASS);
            assert_eq!((c.budget_drops, c.bypassed), (0, 1));
        }
    }
}

#[test]
fn policy_profiles_map_to_signature_selections() {
    let classes = Classifications::default();
    let p = |sigs: &[&str]| Profile {
        name: "p".into(),
        signatures: sigs.iter().map(|s| s.to_string()).collect(),
        span: Default::default(),
    };
    let spec = profile_spec(&p(&["all"]), &classes).unwrap();
    assert!(spec.all);
    let spec = profile_spec(&p(&["critical"]), &classes).unwrap();
    assert_eq!(spec.max_priority, Some(1));
    let spec = profile_spec(&p(&["critical", "standard"]), &classes).unwrap();
    assert_eq!(spec.max_priority, Some(2), "the union");
    let spec = profile_spec(&p(&["priority:3", "sid:42", "trojan-activity"]), &classes).unwrap();
    assert_eq!(
        (spec.max_priority, spec.sids.as_slice(), spec.classtypes.as_slice()),
        (Some(3), &[42][..], &["trojan-activity".to_string()][..])
    );
    for bad in ["priority:0", "priority:x", "sid:-1", "no-such-classtype"] {
        let e = profile_spec(&p(&[bad]), &classes).unwrap_err();
        assert!(e.contains(bad), "{bad}: {e}");
    }
}

#[test]
fn a_broken_rules_file_is_refused_with_its_position() {
    let w = world(None, false);
    let err = Signatures::compile(
        "alert tcp any any -> any any (msg:\"x\"; bogus_keyword; sid:9;)\n",
        Path::new("bad.rules"),
        Classifications::default(),
        false,
        &w.model,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("bad.rules") && err.contains("bogus_keyword"), "{err}");
    // With skip_invalid, the others load and the refusal is counted.
    let text = format!("{RULES}alert tcp any any -> any any (msg:\"x\"; bogus_keyword; sid:9;)\n");
    let sigs = Signatures::compile(
        &text,
        Path::new("bad.rules"),
        Classifications::default(),
        true,
        &w.model,
    )
    .unwrap();
    assert_eq!((sigs.len(), sigs.refused), (3, 1));
}

#[test]
fn signatures_reload_only_when_their_files_or_the_profiles_change() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("x.rules");
    std::fs::write(&rules, RULES).unwrap();
    let config = palisade_agent::config::InspectConfig {
        rules: rules.clone(),
        classification: None,
        skip_invalid: false,
        threshold: None,
        budget_bytes_per_s: None,
        stream_memory_mib: None,
        max_flows: None,
    };
    let w = world(None, false);
    let sigs = Signatures::load(&config, &w.model).unwrap();
    assert!(sigs.unchanged(&config, &w.model));
    // Another policy with other profiles.
    let mut other = w.model.clone();
    other.policy.profiles[1].signatures = vec!["standard".into()];
    assert!(!sigs.unchanged(&config, &other));
    // The rules file rewritten.
    std::fs::write(&rules, format!("{RULES}\n# one more line\n")).unwrap();
    assert!(!sigs.unchanged(&config, &w.model));
    // Not a regular file, or missing: refused, naming it.
    for bad in [dir.path().to_path_buf(), dir.path().join("missing.rules")] {
        let c = palisade_agent::config::InspectConfig {
            rules: bad.clone(),
            ..config.clone()
        };
        let e = Signatures::load(&c, &w.model).unwrap_err().to_string();
        assert!(e.contains(&*bad.to_string_lossy()), "{e}");
    }
}

/// Repeated `alert`-only hits of one signature on one flow are one record
/// with a count; past the bound, alerts are shed and counted (never
/// silently), `drop`/`reject` ones against their own bound; a take starts
/// a new window.
#[test]
fn repeated_alerts_coalesce_and_alerts_past_the_bound_are_counted_not_lost() {
    let mut w = world_bounded(None, false, Some((2, 1)));
    let crit = b"crit-91b0";
    let evil = b"GET /?q=evil-7f3a HTTP/1.1\r\n\r\n";
    // Flow 1 (critical): the signature three times.
    let (mut seq, ack) = w.open_from(41000, 9000);
    for _ in 0..3 {
        let f = tcp_frame((A, 41000), (B, 9000), seq, ack, TcpFlags::ACK | TcpFlags::PSH, crit);
        assert_eq!(w.send(A, &f, Offload::NONE), PASS);
        seq += crit.len() as u32;
    }
    // Flows 2 and 3: once each; flow 3 is past the bound of 2.
    for cport in [41001, 41002] {
        let (seq, ack) = w.open_from(cport, 9000);
        let f = tcp_frame((A, cport), (B, 9000), seq, ack, TcpFlags::ACK | TcpFlags::PSH, crit);
        assert_eq!(w.send(A, &f, Offload::NONE), PASS);
    }
    // Two flows dropped: the second drop's alert is past the blocked bound of 1.
    for cport in [41003, 41004] {
        let (seq, ack) = w.open_from(cport, 8080);
        let f = tcp_frame((A, cport), (B, 8080), seq, ack, TcpFlags::ACK | TcpFlags::PSH, evil);
        assert_eq!(
            w.send(A, &f, Offload::NONE),
            Fate::Forwarded {
                inspected: true,
                verdict: InlineVerdict::Drop
            },
            "a shed alert still drops"
        );
    }
    let c = w.inline.counters();
    assert_eq!(
        (c.alerts, c.alerts_coalesced, c.alerts_discarded, c.blocked_discarded),
        (7, 2, 2, 1)
    );
    let taken = w.inline.take_records();
    let got: Vec<(u16, u32, u64, &str)> = taken
        .records
        .iter()
        .map(|r| (r.src_port, r.alert.signature_id, r.count, r.alert.action.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (41000, 2, 3, "allowed"),
            (41001, 2, 1, "allowed"),
            (41003, 1, 1, "blocked")
        ]
    );
    let first = &taken.records[0];
    assert!(first.last_ns > first.time_ns, "{first:?}");
    assert_eq!((taken.shed, taken.shed_blocked), (2, 1));
    assert!(taken.shed_since_ns.is_some());
    // The trail gets the shed ones as one record saying how many, then each record.
    let trail = taken.audit_records("h1", w.now);
    assert_eq!(trail.len(), 4);
    match &trail[0] {
        palisade_audit::record::Record::AlertsNotRecorded(g) => {
            assert_eq!((g.count, g.blocked, g.host.as_str(), g.time_ns), (2, 1, "h1", w.now));
            assert!(g.since_ns > 0 && g.since_ns <= w.now, "{g:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        trail[1..]
            .iter()
            .zip(&taken.records)
            .all(|(r, a)| *r == palisade_audit::record::Record::Alert(a.clone()))
    );
    // A new window: the next hit on flow 1 is a record of its own.
    let f = tcp_frame((A, 41000), (B, 9000), seq, ack, TcpFlags::ACK | TcpFlags::PSH, crit);
    assert_eq!(w.send(A, &f, Offload::NONE), PASS);
    let next = w.inline.take_records();
    assert_eq!(next.records.len(), 1);
    assert_eq!((next.records[0].count, next.shed, next.shed_since_ns), (1, 0, None));
}

/// A `threshold.config` applies to the agent's signatures: a suppression
/// for the client's address keeps sid 1 from alerting while its `drop`
/// still drops, a `limit` threshold keeps sid 2 to one alert however often
/// it matches; a broken file is refused with its path, line and column, and
/// a changed one is a reload.
#[test]
fn a_threshold_config_suppresses_and_limits_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("x.rules");
    std::fs::write(&rules, RULES).unwrap();
    let thresholds = dir.path().join("threshold.config");
    std::fs::write(
        &thresholds,
        "suppress gen_id 1, sig_id 1, track by_src, ip 10.0.0.10\n\
         threshold gen_id 1, sig_id 2, type limit, track by_rule, count 1, seconds 3600\n",
    )
    .unwrap();
    let config = palisade_agent::config::InspectConfig {
        rules,
        classification: None,
        skip_invalid: false,
        threshold: Some(thresholds.clone()),
        budget_bytes_per_s: None,
        stream_memory_mib: None,
        max_flows: None,
    };
    let mut w = world(None, false);
    let sigs = Arc::new(Signatures::load(&config, &w.model).unwrap());
    w.inline = Inline::new(InlineSetup {
        signatures: sigs.clone(),
        budget_bytes_per_s: None,
        stream_memory: 16 << 20,
        max_flows: 1024,
        fail_closed: vec![false; 3].into(),
        host: "h1".into(),
        clock: Clock { unix_at_zero: 0 },
    });
    let (seq, ack) = w.open_from(42000, 8080);
    let evil = b"GET /?q=evil-7f3a HTTP/1.1\r\n\r\n";
    let f = tcp_frame((A, 42000), (B, 8080), seq, ack, TcpFlags::ACK | TcpFlags::PSH, evil);
    assert_eq!(
        w.send(A, &f, Offload::NONE),
        Fate::Forwarded {
            inspected: true,
            verdict: InlineVerdict::Drop
        },
        "suppressed, the drop still drops"
    );
    assert!(w.inline.take_records().records.is_empty(), "but raises no alert");
    let crit = b"crit-91b0";
    for cport in [42001, 42002, 42003] {
        let (seq, ack) = w.open_from(cport, 9000);
        let f = tcp_frame((A, cport), (B, 9000), seq, ack, TcpFlags::ACK | TcpFlags::PSH, crit);
        assert_eq!(w.send(A, &f, Offload::NONE), PASS);
    }
    let sids: Vec<u32> = w
        .inline
        .take_records()
        .records
        .iter()
        .map(|r| r.alert.signature_id)
        .collect();
    assert_eq!(sids, [2], "limit 1 by rule: one alert of three matches");
    assert_eq!(w.inline.engine_counters().alerts_suppressed, 3);
    assert!(sigs.unchanged(&config, &w.model));
    std::fs::write(&thresholds, "suppress gen_id 1, sig_id 2, track by_dst ip 10.0.0.11\n").unwrap();
    assert!(
        !sigs.unchanged(&config, &w.model),
        "a changed threshold.config is a reload"
    );
    let e = Signatures::load(&config, &w.model).unwrap_err().to_string();
    assert!(
        e.contains(&*thresholds.to_string_lossy()) && e.contains("line 1, column 30"),
        "{e}"
    );
}

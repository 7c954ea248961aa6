//! Flow events of a real engine → the audit trail's flow records: both ends'
//! identity from the inventory, the deciding rules, Unix time, the counts of
//! each direction.

mod support;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use palisade_agent::records::{Clock, Identities, flow_record, update_record};
use palisade_audit::record::{Decision, EndReason, FlowRecord, Phase, Verdict};
use palisade_datapath::EventKind;
use palisade_datapath::{FlowEvent, Results};
use palisade_wire::ethernet::EthernetAddress;
use palisade_wire::tcp::TcpFlags;
use support::{VERSION, ip, syn, tcp_between, tcp_frame};

const CLOCK: Clock = Clock {
    unix_at_zero: 1_700_000_000_000_000_000,
};
const S: u64 = 1_000_000_000;

fn decision(rule: &str, level: &str, chain: &str) -> Decision {
    Decision {
        rule: rule.into(),
        level: level.into(),
        policy_version: VERSION,
        chain: chain.into(),
    }
}

fn tags(tier: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("tier".to_string(), tier.to_string())])
}

/// Every record the events give, in order.
fn records(events: &[FlowEvent], h: &palisade_datapath::host::HostEngine, ids: &Identities) -> Vec<FlowRecord> {
    events
        .iter()
        .filter_map(|e| flow_record(e, "hv1", &h.engine, ids, CLOCK))
        .collect()
}

#[test]
fn a_connection_is_recorded_at_its_start_and_its_end_with_both_ends_identity() {
    let c = support::compiler(4);
    let mut h = support::engine(&c);
    let ids = Identities::new(c.model());
    let mut events = Vec::new();
    let syn = syn(0, 1, 40000, 5432);
    let syn_ack = tcp_frame(
        1,
        0,
        5432,
        40000,
        TcpFlags(TcpFlags::SYN.0 | TcpFlags::ACK.0),
        5000,
        1001,
    );
    let _ = h
        .engine
        .process(2 * S, h.ports[0], &syn, &mut events, &mut Results::new());
    let _ = h
        .engine
        .process(3 * S, h.ports[1], &syn_ack, &mut events, &mut Results::new());
    let start = records(&events, &h, &ids);
    assert_eq!(start.len(), 1, "{events:?}");
    let r = &start[0];
    assert_eq!((r.phase, r.verdict), (Phase::Start, Verdict::Allow));
    assert_eq!((r.time_ns, r.start_ns), (CLOCK.unix(2 * S), CLOCK.unix(2 * S)));
    assert_eq!((r.host.as_str(), r.protocol), ("hv1", 6));
    assert_eq!((r.src.addr, r.src.port), (IpAddr::from(ip(0)), 40000));
    assert_eq!((r.dst.addr, r.dst.port), (IpAddr::from(ip(1)), 5432));
    let (src, dst) = (r.src.vm.as_ref().unwrap(), r.dst.vm.as_ref().unwrap());
    assert_eq!(
        (
            src.name.as_str(),
            src.vnic.as_str(),
            src.zone.as_str(),
            src.host.as_deref()
        ),
        ("vm-0", "vm-0.0", "web", Some("hv1"))
    );
    assert_eq!(src.uuid, "00000000-0000-4000-8000-000000000000");
    assert_eq!((src.tags.clone(), dst.tags.clone()), (tags("web"), tags("db")));
    assert_eq!((dst.name.as_str(), dst.vnic.as_str()), ("vm-1", "vm-1.0"));
    // Both ends' chains decided: the initiator's egress, the responder's ingress.
    assert_eq!(
        r.decided_by,
        [
            decision("web-to-db", "zone", "egress"),
            decision("web-to-db", "zone", "ingress")
        ]
    );

    // Idle long enough, the connection times out: its end record carries the same id and the counts.
    events.clear();
    h.engine.expire(3 * S + 3600 * S, usize::MAX, &mut events);
    let end = records(&events, &h, &ids);
    assert_eq!(end.len(), 1, "{events:?}");
    let e = &end[0];
    assert_eq!((e.phase, e.verdict), (Phase::End(EndReason::Timeout), Verdict::Allow));
    assert_eq!(e.flow_id, r.flow_id, "one id for every record of a connection");
    assert_eq!((e.start_ns, e.last_ns), (CLOCK.unix(2 * S), CLOCK.unix(3 * S)));
    assert_eq!((e.packets_out, e.packets_in), (1, 1));
    let ev = events.iter().find(|e| matches!(e.kind, EventKind::End(_))).unwrap();
    assert_eq!(e.bytes_out + e.bytes_in, ev.bytes);
    assert_eq!(e.bytes_in, ev.reply_bytes);
    assert!(e.bytes_in > 0 && e.bytes_out > 0);
    assert_eq!(e.src.vm, r.src.vm);
}

#[test]
fn updates_are_recorded_only_when_asked_for() {
    let c = support::compiler(2);
    let mut h = support::engine(&c);
    let ids = Identities::new(c.model());
    let mut events = Vec::new();
    let _ = h
        .engine
        .process(S, h.ports[0], &syn(0, 1, 40001, 5432), &mut events, &mut Results::new());
    let start = events.iter().find(|e| e.kind == EventKind::Start).unwrap();
    // A state change inside a connection's life is not a record of its own…
    let update = FlowEvent {
        kind: EventKind::Update,
        now: 5 * S,
        ..*start
    };
    assert_eq!(flow_record(&update, "hv1", &h.engine, &ids, CLOCK), None);
    // …but the periodic update is, with the connection's id.
    let u = update_record(&update, "hv1", &h.engine, &ids, CLOCK);
    let s = flow_record(start, "hv1", &h.engine, &ids, CLOCK).unwrap();
    assert_eq!(
        (u.phase, u.verdict, u.flow_id),
        (Phase::Update, Verdict::Allow, s.flow_id)
    );
    assert_eq!(u.time_ns, CLOCK.unix(5 * S));
    assert_eq!(u.decided_by, s.decided_by);
}

#[test]
fn denied_flows_name_the_rule_or_the_default_that_denied_them() {
    let c = support::compiler(2);
    let mut h = support::engine(&c);
    let ids = Identities::new(c.model());
    let mut events = Vec::new();
    // Telnet: the datacenter rule.
    let _ = h
        .engine
        .process(S, h.ports[0], &syn(0, 1, 40002, 23), &mut events, &mut Results::new());
    // db → web: no rule allows it; the zone's default (the datacenter's: deny) does.
    let _ = h.engine.process(
        2 * S,
        h.ports[1],
        &syn(1, 0, 40003, 5432),
        &mut events,
        &mut Results::new(),
    );
    let r = records(&events, &h, &ids);
    assert_eq!(r.len(), 2, "{events:?}");
    assert_eq!((r[0].phase, r[0].verdict), (Phase::Start, Verdict::Deny));
    assert!(
        r[0].decided_by
            .iter()
            .any(|d| d.rule == "no-telnet" && d.level == "datacenter"),
        "{:?}",
        r[0].decided_by
    );
    assert_eq!(r[1].verdict, Verdict::Deny);
    assert!(
        !r[1].decided_by.is_empty() && r[1].decided_by.iter().all(|d| d.rule == "default"),
        "{:?}",
        r[1].decided_by
    );
    assert_eq!(r[1].src.vm.as_ref().unwrap().name, "vm-1");
    assert_eq!(r[1].dst.vm.as_ref().unwrap().name, "vm-0");
}

#[test]
fn remote_and_unmanaged_ends() {
    let c = support::compiler(2);
    let mut h = support::engine(&c);
    let ids = Identities::new(c.model());
    let mut events = Vec::new();
    // To `far`, a db-tier VM on hv2: allowed, and its identity says where it runs.
    let far = (EthernetAddress([2, 0, 0, 0, 0, 0xff]), Ipv4Addr::new(10, 0, 1, 1), 5432);
    let _ = h.engine.process(
        S,
        h.ports[0],
        &tcp_between((support::mac(0), ip(0), 40004), far, TcpFlags::SYN, 1, 0),
        &mut events,
        &mut Results::new(),
    );
    // To an address no VM has: the rules deny it, and its end has no identity.
    let outside = (
        EthernetAddress([0x0e, 0, 0, 0, 0, 0xfe]),
        Ipv4Addr::new(192, 0, 2, 1),
        5432,
    );
    let _ = h.engine.process(
        2 * S,
        h.ports[0],
        &tcp_between((support::mac(0), ip(0), 40005), outside, TcpFlags::SYN, 1, 0),
        &mut events,
        &mut Results::new(),
    );
    let r = records(&events, &h, &ids);
    assert_eq!(r.len(), 2, "{events:?}");
    let remote = r[0].dst.vm.as_ref().unwrap();
    assert_eq!(
        (remote.name.as_str(), remote.host.as_deref(), r[0].verdict),
        ("far", Some("hv2"), Verdict::Allow)
    );
    assert_eq!(r[1].dst.vm, None);
    assert_eq!(r[1].dst.addr, IpAddr::from(Ipv4Addr::new(192, 0, 2, 1)));
    assert_eq!(r[1].src.vm.as_ref().unwrap().name, "vm-0");
}

#[test]
fn identities_are_found_by_any_spelling_of_an_address_and_time_saturates() {
    let c = support::compiler(2);
    let ids = Identities::new(c.model());
    let mapped = IpAddr::V6(ip(1).to_ipv6_mapped());
    assert_eq!(ids.of(mapped).map(|v| v.name.as_str()), Some("vm-1"));
    assert_eq!(ids.of(IpAddr::V6(Ipv6Addr::LOCALHOST)), None);
    assert_eq!(
        Clock {
            unix_at_zero: u64::MAX - 1
        }
        .unix(5),
        u64::MAX
    );
}

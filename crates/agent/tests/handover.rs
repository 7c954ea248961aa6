//! A live migration's state move between two hosts' engines, pre-copy and
//! delta, as the agents do it over their channel: exported from every
//! worker ([`migrate::export_changes`]), encoded for the wire, staged and
//! committed by the destination's session ([`Staging`]), applied to its
//! workers' tables ([`migrate::apply_arrival`]).

use core::net::Ipv4Addr;

use palisade_agent::migrate;
use palisade_agent::peer::Staging;
use palisade_datapath::port::UplinkConfig;
use palisade_datapath::port::{self, PortId};
use palisade_datapath::transfer;
use palisade_datapath::{Disposition, DropReason, Engine, EngineConfig, FlowEvent, PolicyLookup, Results};
use palisade_policy::compile::Compiler;
use palisade_policy::{MemorySource, load};
use palisade_testkit::engine::tcp_v4_frame;
use palisade_wire::ethernet::EthernetAddress;
use palisade_wire::tcp::TcpFlags;

fn policy(ssh: bool) -> Compiler {
    let text = format!(
        r#"
version: {version}
datacenter: {{ name: dc1, default: deny }}
zones: [{{ name: web, vlan: 100 }}]
vms:
  - {{ name: a, uuid: 00000000-0000-4000-8000-00000000000a, host: h1, vnics: [{{ name: a.0, mac: "02:00:00:00:00:0a", ips: [10.0.0.10], zone: web }}] }}
  - {{ name: b, uuid: 00000000-0000-4000-8000-00000000000b, host: h1, vnics: [{{ name: b.0, mac: "02:00:00:00:00:0b", ips: [10.0.0.11], zone: web }}] }}
groups: {{ web: {{ zone: web }} }}
rules:
  datacenter:
    - {{ id: https, from: web, to: web, service: tcp/443, action: allow }}
    {ssh}
"#,
        version = if ssh { 1 } else { 2 },
        ssh = if ssh {
            "- { id: ssh, from: web, to: web, service: tcp/22, action: allow }"
        } else {
            ""
        }
    );
    let loaded = load(&MemorySource::new().with("p.yaml", text)).unwrap();
    assert!(!loaded.has_errors(), "{}", loaded.render());
    Compiler::new(loaded.model).unwrap()
}

/// A host's engine with a.0 (strict windows) and b.0.
fn engine(host: u8, ssh: bool) -> (Engine, PortId, PortId) {
    let c = policy(ssh);
    let model = c.model().clone();
    let mut e = Engine::new(
        EngineConfig::new(UplinkConfig {
            local_mac: EthernetAddress([0x0e, 0, 0, 0, 0, host]),
            local_ip: Ipv4Addr::new(192, 168, 0, host),
            gateway_mac: EthernetAddress([0x0e, 0, 0, 0, 0, 0xfe]),
            flood: vec![],
        }),
        Box::new(PolicyLookup::new(c)),
    );
    let a = e
        .add_vnic(port::vnic_from_model(&model, "a.0", &["web".into()], 100).unwrap())
        .unwrap();
    let b = e
        .add_vnic(port::vnic_from_model(&model, "b.0", &["web".into()], 100).unwrap())
        .unwrap();
    (e, a, b)
}

/// A segment of the connection a:`sport` → b:`dport`, sent by b when `reply`.
fn seg(reply: bool, sport: u16, dport: u16, (seq, ack): (u32, u32), flags: TcpFlags, data: &[u8]) -> Vec<u8> {
    let a = ([2, 0, 0, 0, 0, 10], Ipv4Addr::new(10, 0, 0, 10), sport);
    let b = ([2, 0, 0, 0, 0, 11], Ipv4Addr::new(10, 0, 0, 11), dport);
    if reply {
        tcp_v4_frame(b, a, (seq, ack), flags, data)
    } else {
        tcp_v4_frame(a, b, (seq, ack), flags, data)
    }
}

fn send(e: &mut Engine, now: u64, port: PortId, frame: &[u8]) -> Disposition {
    let mut ev: Vec<FlowEvent> = Vec::new();
    e.process(now, port, frame, &mut ev, &mut Results::new()).disposition
}

/// A handshake a→b from `sport`, sequence numbers 1000 (a) and 9000 (b).
fn handshake(e: &mut Engine, (a, b): (PortId, PortId), sport: u16, dport: u16, now: u64) {
    for (port, frame) in [
        (a, seg(false, sport, dport, (1000, 0), TcpFlags::SYN, b"")),
        (
            b,
            seg(true, sport, dport, (9000, 1001), TcpFlags::SYN | TcpFlags::ACK, b""),
        ),
        (a, seg(false, sport, dport, (1001, 9001), TcpFlags::ACK, b"")),
    ] {
        assert_eq!(send(e, now, port, &frame), Disposition::Forward);
    }
}

#[test]
fn precopy_and_delta_arrive_as_the_source_left_them() {
    let (mut src, a, b) = engine(1, true);
    handshake(&mut src, (a, b), 40030, 443, 0); // advances after the pre-copy
    handshake(&mut src, (a, b), 40031, 443, 0); // untouched
    handshake(&mut src, (a, b), 40033, 22, 0); // untouched; the new policy revokes it
    handshake(&mut src, (a, b), 40034, 22, 0); // revoked and removed before the pause

    let (pre, marks) = migrate::export_changes(&mut [&mut src], "a.0", 10, None).unwrap();
    let mut staging = Staging::new("h1");
    let staged = staging.stage("a.0", &transfer::encode(&pre)).unwrap();
    assert!(staged.stage && staged.removed.is_empty());
    let (mut dst, a2, b2) = engine(2, true);
    let apply = |dst: &mut Engine, a: palisade_agent::peer::Arrival, now| {
        migrate::apply_arrival(&mut [dst], &a.removed, a.revalidate, a.snapshot, now)
    };
    assert_eq!(apply(&mut dst, staged, 15), Ok(4));
    assert_eq!(dst.conntrack().len(), 4);

    // The guest runs on: a segment on 40030, a new connection, a policy
    // change on both hosts, the source cutting 40034 on its next packet.
    let data = seg(
        false,
        40030,
        443,
        (1001, 9001),
        TcpFlags::ACK | TcpFlags::PSH,
        b"0123456789",
    );
    assert_eq!(send(&mut src, 20, a, &data), Disposition::Forward);
    handshake(&mut src, (a, b), 40035, 443, 21);
    src.update_policy(Box::new(PolicyLookup::new(policy(false))));
    dst.update_policy(Box::new(PolicyLookup::new(policy(false))));
    let ssh = seg(false, 40034, 22, (1001, 9001), TcpFlags::ACK, b"");
    assert_eq!(
        send(&mut src, 22, a, &ssh),
        Disposition::Drop(DropReason::PolicyRevoked)
    );

    let (delta, _) = migrate::export_changes(&mut [&mut src], "a.0", 30, Some(&marks)).unwrap();
    assert!(!delta.full);
    let delta_blob = transfer::encode(&delta);
    let arrival = staging.commit("a.0", &delta_blob).unwrap();
    assert_eq!(arrival.peer, "h1");
    assert!(
        !arrival.stage && arrival.revalidate,
        "staged under version 1, delta under 2"
    );
    // The delta: 40030 advanced, 40035 new; 40034 removed.
    assert_eq!(apply(&mut dst, arrival, 1_000), Ok(2));
    staging.committed("a.0");
    assert!(staging.leftovers().is_empty());
    assert_eq!(dst.conntrack().len(), 4);

    // The closed connection did not come back.
    assert!(
        dst.conntrack().iter().all(|(_, c)| c.key.src_port != 40034),
        "the removed connection is not in the destination's table"
    );
    let removed = seg(false, 40034, 22, (1001, 9001), TcpFlags::ACK, b"");
    assert_eq!(
        send(&mut dst, 1_001, a2, &removed),
        Disposition::Drop(DropReason::PolicyDeny)
    );
    // The one the new policy revokes stays revoked, though it was staged
    // under the old one and had no packet since.
    let ssh = seg(false, 40033, 22, (1001, 9001), TcpFlags::ACK, b"");
    assert_eq!(
        send(&mut dst, 1_002, a2, &ssh),
        Disposition::Drop(DropReason::PolicyRevoked)
    );
    // The advanced connection continues from where it was in the pause (the
    // pre-copy's window would refuse nothing here; its sequence must match).
    let next = seg(false, 40030, 443, (1011, 9001), TcpFlags::ACK | TcpFlags::PSH, b"x");
    assert_eq!(send(&mut dst, 1_003, a2, &next), Disposition::Forward);
    // The untouched and the new connections are there too.
    for sport in [40031, 40035] {
        let reply = seg(true, sport, 443, (9001, 1001), TcpFlags::ACK, b"");
        assert_eq!(send(&mut dst, 1_004, b2, &reply), Disposition::Forward, "{sport}");
    }
}

#[test]
fn a_delta_without_a_staged_precopy_is_refused_and_a_full_one_needs_none() {
    let (mut src, a, b) = engine(1, true);
    handshake(&mut src, (a, b), 40030, 443, 0);
    let (pre, marks) = migrate::export_changes(&mut [&mut src], "a.0", 10, None).unwrap();
    let (delta, _) = migrate::export_changes(&mut [&mut src], "a.0", 20, Some(&marks)).unwrap();
    let mut staging = Staging::new("h1");
    assert_eq!(
        staging.commit("a.0", &transfer::encode(&delta)).unwrap_err(),
        "a delta for vNIC \"a.0\" without a staged pre-copy"
    );
    assert_eq!(
        staging.stage("b.0", &transfer::encode(&pre)).unwrap_err(),
        "pre-copy is for vNIC \"a.0\", not \"b.0\""
    );
    let arrival = staging.commit("a.0", &transfer::encode(&pre)).unwrap();
    assert_eq!(arrival.snapshot.conns.len(), 1);
    assert!(arrival.removed.is_empty());
    // A full transfer over a staged copy removes that copy first; a cut
    // blob is refused whole; what a session staged and did not commit is
    // left over to remove.
    let blob = transfer::encode(&pre);
    staging.stage("a.0", &blob).unwrap();
    assert_eq!(
        staging.stage("a.0", &blob).unwrap_err(),
        "vNIC \"a.0\" is staged already"
    );
    assert!(staging.commit("a.0", &blob[..blob.len() - 1]).is_err());
    let full = staging.commit("a.0", &blob).unwrap();
    assert_eq!(full.removed.len(), 1);
    let left = staging.leftovers();
    assert_eq!(left.len(), 1);
    assert_eq!((left[0].0.as_str(), left[0].1.len()), ("a.0", 1));
}

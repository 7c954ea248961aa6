//! The engine's verdicts where issue 26 found them disagreeing with the
//! policy (`DESIGN.md`, "ICMP"; the policy README's semantics) or with Linux
//! conntrack: echo replies, SCTP ports, ICMP errors, strict TCP. One test per
//! defect, each failing on the code before its fix.

use core::net::Ipv4Addr;

use palisade_datapath::FlowEvent;
use palisade_datapath::PolicyLookup;
use palisade_datapath::port::{self, PortId, UplinkConfig};
use palisade_datapath::{Disposition, Engine, EngineConfig, Results};
use palisade_policy::compile::Compiler;
use palisade_policy::{MemorySource, load};
use palisade_testkit::vm_frame;
use palisade_wire::ethernet::EthernetAddress;
use palisade_wire::icmpv4;
use palisade_wire::ip::IpProtocol;
use palisade_wire::tcp::{self, TcpFlags, TcpRepr};

/// VMs a (10.0.0.10) and b (10.0.0.11), both on host h1, zone web; `rules`
/// is the datacenter level; the default denies.
fn policy(rules: &str) -> String {
    format!(
        r#"
version: 1
datacenter: {{ name: dc1, default: deny }}
zones: [{{ name: web, vlan: 100 }}]
vms:
  - {{ name: a, uuid: 00000000-0000-4000-8000-00000000000a, host: h1, vnics: [{{ name: a.0, mac: "02:00:00:00:00:0a", ips: [10.0.0.10], zone: web }}] }}
  - {{ name: b, uuid: 00000000-0000-4000-8000-00000000000b, host: h1, vnics: [{{ name: b.0, mac: "02:00:00:00:00:0b", ips: [10.0.0.11], zone: web }}] }}
rules:
  datacenter:
{rules}
"#
    )
}

/// An engine for h1 with a and b attached; `strict` makes zone web strict.
fn engine(rules: &str, strict: bool) -> Engine {
    let loaded = load(&MemorySource::new().with("p.yaml", policy(rules))).unwrap();
    assert!(!loaded.has_errors(), "{}", loaded.render());
    let compiler = Compiler::new(loaded.model).unwrap();
    let model = compiler.model().clone();
    let cfg = EngineConfig::new(UplinkConfig {
        local_mac: EthernetAddress([0x0e, 0, 0, 0, 0, 1]),
        local_ip: Ipv4Addr::new(192, 168, 0, 1),
        gateway_mac: EthernetAddress([0x0e, 0, 0, 0, 0, 0xfe]),
        flood: vec![Ipv4Addr::new(192, 168, 0, 2)],
    });
    let mut e = Engine::new(cfg, Box::new(PolicyLookup::new(compiler)));
    let strict_zones = if strict { vec!["web".to_string()] } else { Vec::new() };
    for nic in ["a.0", "b.0"] {
        e.add_vnic(port::vnic_from_model(&model, nic, &strict_zones, 100).unwrap())
            .unwrap();
    }
    e
}

const A: u8 = 10;
const B: u8 = 11;

fn port_of(e: &Engine, vm: u8) -> PortId {
    e.port_of(if vm == A { "a.0" } else { "b.0" }).unwrap()
}

/// Process a frame sent by VM `from` (on its own vNIC).
fn send(e: &mut Engine, now: u64, from: u8, frame: &[u8]) -> Disposition {
    let mut events: Vec<FlowEvent> = Vec::new();
    e.process(now, port_of(e, from), frame, &mut events, &mut Results::new())
        .disposition
}

fn forwarded(d: Disposition) -> bool {
    d == Disposition::Forward
}

/// An ICMP message from `from` to `to`: type, code, the 4 bytes after the
/// checksum (echo: identifier and sequence), then `data`.
fn icmp(from: u8, to: u8, ty: u8, code: u8, rest: [u8; 4], data: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(data);
    icmpv4::Packet::new_unchecked(&mut m[..]).fill_checksum();
    vm_frame(from, to, IpProtocol::ICMP, &m)
}

/// An ICMP error from `from` to `to` quoting the IP header and the first 8
/// bytes of the transport header of `frame` (an untagged Ethernet frame).
fn icmp_error(from: u8, to: u8, ty: u8, code: u8, frame: &[u8]) -> Vec<u8> {
    icmp(from, to, ty, code, [0; 4], &frame[14..14 + 28])
}

/// An SCTP packet: the common header (ports, verification tag, checksum
/// left 0) and one chunk header of `chunk` type.
fn sctp(from: u8, to: u8, sport: u16, dport: u16, vtag: u32, chunk: u8) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&vtag.to_be_bytes());
    s.extend_from_slice(&[0; 4]);
    s.extend_from_slice(&[chunk, 0, 0, 4]);
    vm_frame(from, to, IpProtocol(132), &s)
}

/// A TCP segment of `len` payload bytes; `(win, options)` its window and raw option bytes (padded to 4).
fn tcp_opts(
    from: u8,
    to: u8,
    ports: (u16, u16),
    (seq, ack): (u32, u32),
    flags: TcpFlags,
    (win, options): (u16, &[u8]),
    len: usize,
) -> Vec<u8> {
    let payload = vec![0x61; len];
    let repr = TcpRepr {
        src_port: ports.0,
        dst_port: ports.1,
        seq_number: seq,
        ack_number: ack,
        flags,
        window_len: win,
        urgent_pointer: 0,
        options,
        payload: &payload,
    };
    let mut t = vec![0; repr.buffer_len()];
    let (src, dst) = (Ipv4Addr::new(10, 0, 0, from), Ipv4Addr::new(10, 0, 0, to));
    repr.emit(&mut tcp::Packet::new_unchecked(&mut t[..]), src.into(), dst.into());
    vm_frame(from, to, IpProtocol::TCP, &t)
}

fn tcp(from: u8, to: u8, ports: (u16, u16), seq: u32, ack: u32, flags: TcpFlags, len: usize) -> Vec<u8> {
    tcp_opts(from, to, ports, (seq, ack), flags, (64000, &[]), len)
}

const SYN: TcpFlags = TcpFlags::SYN;
const ACK: TcpFlags = TcpFlags::ACK;
const FIN: TcpFlags = TcpFlags::FIN;

/// Defect 1: an echo reply was judged as an echo request (the flow key kept
/// only the identifier), so an unsolicited reply passed wherever its sender
/// may ping, and opened a connection through which the other side's echo
/// request passed as a "reply" against the policy.
#[test]
fn an_unsolicited_echo_reply_is_judged_as_a_reply_and_opens_nothing() {
    // a may ping b; nothing else is allowed.
    let mut e = engine(
        "    - { id: a-pings-b, from: 10.0.0.10, to: 10.0.0.11, service: icmp/echo-request, action: allow }",
        false,
    );
    let id = [0x12, 0x34, 0, 1];
    let reply = icmp(A, B, 0, 0, id, b"pong");
    assert!(
        !forwarded(send(&mut e, 0, A, &reply)),
        "no rule allows echo replies from a to b"
    );
    let request = icmp(B, A, 8, 0, id, b"ping");
    assert!(
        !forwarded(send(&mut e, 1, B, &request)),
        "b may not ping a, whatever a sent before"
    );
    // The request a may send opens a connection its reply passes through.
    assert!(forwarded(send(&mut e, 2, A, &icmp(A, B, 8, 0, id, b"ping"))));
    assert!(forwarded(send(&mut e, 3, B, &icmp(B, A, 0, 0, id, b"pong"))));

    // A rule on echo-reply decides unsolicited replies, and opens nothing.
    let mut e = engine(
        "    - { id: a-replies, from: 10.0.0.10, to: 10.0.0.11, service: icmp/echo-reply, action: allow }",
        false,
    );
    assert!(forwarded(send(&mut e, 0, A, &reply)), "icmp/echo-reply allows it");
    assert!(
        !forwarded(send(&mut e, 1, B, &request)),
        "the allowed reply opened no connection for b's request"
    );
}

/// Defect 2: SCTP ports were never read, so no `sctp/PORT` rule could match,
/// and ICMP errors about SCTP could never be related to their association.
#[test]
fn sctp_rules_match_their_port_and_errors_about_sctp_are_related() {
    let mut e = engine(
        "    - { id: a-sctp, from: 10.0.0.10, to: 10.0.0.11, service: sctp/5000, action: allow }",
        false,
    );
    let init = sctp(A, B, 40000, 5000, 0, 1);
    assert!(forwarded(send(&mut e, 0, A, &init)), "sctp/5000 allows a's INIT");
    assert!(
        forwarded(send(&mut e, 1, B, &sctp(B, A, 5000, 40000, 7, 2))),
        "b's INIT-ACK is the association's reply"
    );
    assert!(
        !forwarded(send(&mut e, 2, A, &sctp(A, B, 40000, 5001, 0, 1))),
        "another port is not allowed"
    );
    // Port unreachable from b about a's packet: related to the association.
    let later = sctp(A, B, 40000, 5000, 7, 0);
    assert!(forwarded(send(&mut e, 3, A, &later)));
    assert!(
        forwarded(send(&mut e, 4, B, &icmp_error(B, A, 3, 3, &later))),
        "an error about a tracked association passes"
    );
}

/// Defect 3: rules on ICMP error types had no effect. A related error passes
/// unless a rule for its type/code denies it; an unrelated error is decided
/// by the policy like any other flow.
#[test]
fn icmp_errors_follow_the_policy_related_or_not() {
    let rules = "    - { id: udp, from: 10.0.0.10, to: 10.0.0.11, service: udp/53, action: allow }
    - { id: no-host-unreach, from: 10.0.0.11, to: 10.0.0.10, service: icmp/3/1, action: deny }
    - { id: pmtud, from: 10.0.0.11, to: 10.0.0.10, service: icmp/3/4, action: allow }";
    let mut e = engine(rules, false);
    let query = vm_frame(A, B, IpProtocol::UDP, &[0x9c, 0x40, 0, 53, 0, 8, 0, 0]);
    assert!(forwarded(send(&mut e, 0, A, &query)));
    // Related, no rule names port unreachable: passes (the default deny does not apply).
    assert!(forwarded(send(&mut e, 1, B, &icmp_error(B, A, 3, 3, &query))));
    // Related, but a rule denies host unreachable.
    assert!(
        !forwarded(send(&mut e, 2, B, &icmp_error(B, A, 3, 1, &query))),
        "icmp/3/1 deny drops even a related error"
    );
    // Unrelated (it quotes a datagram nobody sent): the policy decides.
    let never = vm_frame(A, B, IpProtocol::UDP, &[0x9c, 0x41, 0, 53, 0, 8, 0, 0]);
    assert!(
        forwarded(send(&mut e, 3, B, &icmp_error(B, A, 3, 4, &never))),
        "icmp/3/4 allow passes an unsolicited fragmentation-needed"
    );
    assert!(
        !forwarded(send(&mut e, 4, B, &icmp_error(B, A, 3, 3, &never))),
        "the default denies an unsolicited port unreachable"
    );
}

/// Defect 5: in a strict zone a retransmitted SYN-ACK was dropped whenever
/// the server's initial sequence number lies after the client's (the
/// client's SYN set its limit to its own sequence number).
#[test]
fn a_retransmitted_syn_ack_passes_in_a_strict_zone() {
    let rules = "    - { id: web, from: 10.0.0.10, to: 10.0.0.11, service: tcp/80, action: allow }";
    let mut e = engine(rules, true);
    let (c, s) = ((40000, 80), (80, 40000));
    assert!(forwarded(send(&mut e, 0, A, &tcp(A, B, c, 1000, 0, SYN, 0))));
    let synack = tcp(B, A, s, 900_000, 1001, SYN | ACK, 0);
    assert!(forwarded(send(&mut e, 1, B, &synack)));
    assert!(
        forwarded(send(&mut e, 2, B, &synack)),
        "the SYN-ACK again (the first was lost before the client)"
    );
    assert!(forwarded(send(&mut e, 3, A, &tcp(A, B, c, 1001, 900_001, ACK, 0))));
    assert!(forwarded(send(&mut e, 4, B, &tcp(B, A, s, 900_001, 1001, ACK, 100))));
}

/// Defect 6: duplicate ACKs carrying SACK blocks were dropped in loss
/// recovery once more than ~66 KB was in flight: the acknowledgment was
/// checked, not the highest SACK edge (as Linux does), and the data the
/// SACKs make room for was out of window.
#[test]
fn sack_during_loss_recovery_passes_in_a_strict_zone() {
    let rules = "    - { id: web, from: 10.0.0.10, to: 10.0.0.11, service: tcp/80, action: allow }";
    let mut e = engine(rules, true);
    let (c, s) = ((40001, 80), (80, 40001));
    let sack_permitted = [4, 2, 1, 1];
    let (cisn, sisn) = (1000u32, 5000u32);
    let syn = tcp_opts(A, B, c, (cisn, 0), SYN, (65535, &sack_permitted), 0);
    assert!(forwarded(send(&mut e, 0, A, &syn)));
    let synack = tcp_opts(B, A, s, (sisn, cisn + 1), SYN | ACK, (65535, &sack_permitted), 0);
    assert!(forwarded(send(&mut e, 1, B, &synack)));
    assert!(forwarded(send(&mut e, 2, A, &tcp(A, B, c, cisn + 1, sisn + 1, ACK, 0))));
    // The server sends 1400-byte segments; the first one never reaches the
    // client, which acknowledges its start again and again, with a SACK
    // block up to what it has; the server keeps filling the window the
    // SACKs open (the client's window is 65535, unscaled).
    let hole = sisn + 1;
    let mut now = 3;
    let mut sent = hole;
    for i in 0..150u32 {
        let seg = tcp(B, A, s, sent, cisn + 1, ACK, 1400);
        assert!(
            forwarded(send(&mut e, now, B, &seg)),
            "server segment {i} at +{} is within the window the SACKs advertise",
            sent - hole
        );
        sent += 1400;
        now += 1;
        if i >= 1 {
            let mut sack = vec![1, 1, 5, 10];
            sack.extend_from_slice(&(hole + 1400).to_be_bytes());
            sack.extend_from_slice(&sent.to_be_bytes());
            let dup = tcp_opts(A, B, c, (cisn + 1, hole), ACK, (65535, &sack), 0);
            assert!(
                forwarded(send(&mut e, now, A, &dup)),
                "duplicate ACK {i} with a SACK block up to +{}",
                sent - hole
            );
            now += 1;
        }
    }
}

/// Defect 7: before any SYN-ACK, strict mode accepted anything from the
/// initiator after its SYN. Linux (and now Palisade) marks data, ACKs and
/// FINs before the SYN-ACK invalid.
#[test]
fn nothing_but_a_syn_passes_before_the_syn_ack_in_a_strict_zone() {
    let rules = "    - { id: web, from: 10.0.0.10, to: 10.0.0.11, service: tcp/80, action: allow }";
    let mut e = engine(rules, true);
    let c = (40002, 80);
    assert!(forwarded(send(&mut e, 0, A, &tcp(A, B, c, 1000, 0, SYN, 0))));
    for (what, seg) in [
        ("data", tcp(A, B, c, 1001, 77, ACK | TcpFlags::PSH, 100)),
        ("an ACK", tcp(A, B, c, 1001, 77, ACK, 0)),
        ("a FIN", tcp(A, B, c, 1001, 77, FIN | ACK, 0)),
    ] {
        assert!(
            !forwarded(send(&mut e, 1, A, &seg)),
            "{what} before the SYN-ACK is invalid"
        );
    }
    // A TCP Fast Open SYN (with data), then a FIN|ACK acknowledging nothing.
    let c = (40003, 80);
    assert!(forwarded(send(&mut e, 2, A, &tcp(A, B, c, 5000, 0, SYN, 20))));
    assert!(
        !forwarded(send(&mut e, 3, A, &tcp(A, B, c, 5021, 0, FIN | ACK, 0))),
        "a FIN|ACK with ack 0 before the SYN-ACK is invalid"
    );
    // The handshake still works after the invalid segments were dropped.
    let s = (80, 40002);
    assert!(forwarded(send(&mut e, 4, B, &tcp(B, A, s, 9000, 1001, SYN | ACK, 0))));
    assert!(forwarded(send(
        &mut e,
        5,
        A,
        &tcp(A, B, (40002, 80), 1001, 9001, ACK, 0)
    )));
}

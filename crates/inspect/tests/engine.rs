//! The engine on traffic the suricata-verify tests do not cover: stream
//! inspection timing, evasion by segmentation and overlap, actions, flowbits,
//! thresholds, profiles, memory limits, application-layer transactions.

mod support;

use palisade_inspect::packet::tcp_flags;
use palisade_inspect::{
    AlertAction, Config, Direction, DropReason, FlowState, FlowVerdict, Inspector, Mode, Outcome, ProfileId,
    ProfileSpec,
};
use std::time::Duration;
use support::*;

fn ids() -> Config {
    Config::default()
}

fn inline() -> Config {
    Config {
        inline_stream: true,
        ..Config::default()
    }
}

fn ips() -> Config {
    Config {
        mode: Mode::Ips,
        ..Config::default()
    }
}

const EVIL: &str = r#"alert tcp any any -> any any (msg:"evil"; content:"EVIL"; sid:1;)"#;

#[test]
fn ids_inspects_stream_data_once_acknowledged_inline_as_it_arrives() {
    let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 80);
    let mut pkts = t.handshake();
    pkts.push(t.c(b"xxEVILxx")); // 3
    pkts.push(t.ack_from_server()); // 4
    pkts.push(t.c(b"more")); // 5: the next client packet carries the acknowledged window
    for (config, want) in [(ids(), vec![5]), (inline(), vec![3]), (ips(), vec![3])] {
        let mut insp = inspector(EVIL, config.clone());
        let (run, _) = run_flow(&mut insp, &pkts);
        assert_eq!(run.at(1), want, "{config:?}");
    }
}

#[test]
fn unacknowledged_data_is_inspected_when_the_flow_ends() {
    let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 80);
    let mut pkts = t.handshake();
    pkts.push(t.c(b"EVIL"));
    let mut insp = inspector(EVIL, ids());
    let (run, _) = run_flow(&mut insp, &pkts);
    assert_eq!(run.at(1), vec![usize::MAX], "found by the flush");
}

#[test]
fn a_pattern_split_across_segments_is_found_once() {
    for config in [ids(), inline()] {
        let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 80);
        let mut pkts = t.handshake();
        pkts.push(t.c(b"aaaaEV"));
        pkts.push(t.ack_from_server());
        pkts.push(t.c(b"ILbbbb"));
        pkts.push(t.ack_from_server());
        pkts.push(t.c(b"cccc"));
        pkts.push(t.ack_from_server());
        pkts.push(t.c(b"dddd"));
        let mut insp = inspector(EVIL, config.clone());
        let (run, _) = run_flow(&mut insp, &pkts);
        assert_eq!(run.at(1).len(), 1, "{config:?}: {run:?}");
        // A packet-only rule does not see across segments.
        let mut insp = inspector(
            r#"alert tcp any any -> any any (content:"EVIL"; flow:no_stream; sid:2;)"#,
            config.clone(),
        );
        let (run, _) = run_flow(&mut insp, &pkts);
        assert!(run.alerts.is_empty(), "{config:?}");
    }
}

#[test]
fn overlapping_retransmissions_cannot_change_what_is_inspected() {
    // First data wins: a retransmission with other bytes for the same offsets is ignored.
    for (first, second, want_alert) in [(b"GOOD", b"EVIL", false), (b"EVIL", b"GOOD", true)] {
        for config in [ids(), ips()] {
            let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 80);
            let mut pkts = t.handshake();
            pkts.push(t.c_at(0, first));
            pkts.push(t.c_at(0, second));
            t.advance_client(4);
            pkts.push(t.ack_from_server());
            pkts.push(t.c(b"tail"));
            let mut insp = inspector(EVIL, config.clone());
            let (run, _) = run_flow(&mut insp, &pkts);
            assert_eq!(
                !run.alerts.is_empty(),
                want_alert,
                "{first:?} then {second:?} {config:?}"
            );
            assert_eq!(insp.counters().stream.overlap_mismatch, 1);
        }
    }
}

#[test]
fn out_of_order_segments_are_reassembled() {
    let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 80);
    let mut pkts = t.handshake();
    pkts.push(t.c_at(2, b"IL"));
    pkts.push(t.c_at(0, b"EV"));
    t.advance_client(4);
    pkts.push(t.ack_from_server());
    pkts.push(t.c(b"x"));
    let mut insp = inspector(EVIL, ids());
    let (run, _) = run_flow(&mut insp, &pkts);
    assert_eq!(run.at(1), vec![6]);
}

#[test]
fn actions_in_ids_and_ips_mode() {
    let rules = r#"drop tcp any any -> any any (content:"EVIL"; sid:1;)
reject tcp any any -> any any (content:"BAD!"; sid:2;)"#;
    let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 80);
    let mut pkts = t.handshake();
    pkts.push(t.c(b"EVIL")); // 3
    pkts.push(t.s(b"response")); // 4
    pkts.push(t.c(b"more")); // 5
    // IPS: the packet is dropped, and the flow after it.
    let mut insp = inspector(rules, ips());
    let (run, flow) = run_flow(&mut insp, &pkts);
    assert!(matches!(run.outcomes[3], Outcome::Drop(DropReason::Rules(_))));
    assert_eq!(run.outcomes[4], Outcome::Drop(DropReason::FlowDrop));
    assert_eq!(run.outcomes[5], Outcome::Drop(DropReason::FlowDrop));
    assert_eq!(run.raw[0].1.action, AlertAction::Blocked);
    assert_eq!(flow.verdict(), FlowVerdict::Drop);
    // IDS: the same rule alerts and the packet goes on.
    let mut insp = inspector(rules, ids());
    let (run, flow) = run_flow(&mut insp, &pkts);
    assert_eq!(run.outcomes[3], Outcome::Pass, "not acknowledged yet");
    assert_eq!(run.outcomes[5], Outcome::Alert);
    assert_eq!(run.raw[0].1.action, AlertAction::Allowed);
    assert_eq!(flow.verdict(), FlowVerdict::Inspect);
    // Reject answers, in both modes.
    let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 80);
    let mut pkts = t.handshake();
    pkts.push(t.c(b"BAD!"));
    let mut insp = inspector(rules, ips());
    let (run, _) = run_flow(&mut insp, &pkts);
    assert!(matches!(run.outcomes[3], Outcome::Reject(DropReason::Rules(_))));
}

#[test]
fn pass_rules_win_and_an_ip_only_pass_ends_inspection_of_the_flow() {
    let rules = r#"alert ip any any -> any any (msg:"all"; sid:1;)
pass ip 10.0.0.1 any -> any any (sid:2;)
alert tcp any any -> any any (content:"EVIL"; sid:3;)"#;
    let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 80);
    let mut pkts = t.handshake();
    pkts.push(t.c(b"EVIL"));
    let mut insp = inspector(rules, inline());
    let (run, flow) = run_flow(&mut insp, &pkts);
    assert!(run.alerts.is_empty(), "{run:?}");
    assert_eq!(flow.verdict(), FlowVerdict::Pass);
    assert!(flow.is_decided());
    assert_eq!(insp.counters().passed_flow_packets, 3);
    // A pass rule with content passes only the packets it matches.
    let rules = r#"alert tcp any any -> any any (content:"x"; sid:1;)
pass tcp any any -> any any (content:"ok"; sid:2;)"#;
    let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 80);
    let mut pkts = t.handshake();
    pkts.push(t.c(b"x ok"));
    pkts.push(t.c(b"x no"));
    let mut insp = inspector(rules, inline());
    let (run, flow) = run_flow(&mut insp, &pkts);
    assert_eq!(run.at(1), vec![4]);
    assert_eq!(flow.verdict(), FlowVerdict::Inspect);
}

#[test]
fn flowbits_carry_state_between_directions() {
    let rules = r#"alert tcp any any -> any any (msg:"login"; flow:to_server; content:"USER admin"; flowbits:set,admin; flowbits:noalert; sid:1;)
alert tcp any any -> any any (msg:"admin ok"; flow:to_client; content:"230"; flowbits:isset,admin; sid:2;)
alert tcp any any -> any any (msg:"anon ok"; flow:to_client; content:"230"; flowbits:isnotset,admin; sid:3;)"#;
    let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 21);
    let mut pkts = t.handshake();
    pkts.push(t.c(b"USER admin\r\n"));
    pkts.push(t.s(b"230 Logged in\r\n"));
    let mut insp = inspector(rules, inline());
    let (run, _) = run_flow(&mut insp, &pkts);
    assert_eq!(run.sids(), vec![2]);
    let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 21);
    let mut pkts = t.handshake();
    pkts.push(t.c(b"USER bob\r\n"));
    pkts.push(t.s(b"230 Logged in\r\n"));
    let (run, _) = run_flow(&mut insp, &pkts);
    assert_eq!(run.sids(), vec![3]);
}

#[test]
fn host_thresholds_count_across_flows() {
    let rules =
        r#"alert udp any any -> any 53 (content:"x"; threshold:type limit, track by_src, count 2, seconds 60; sid:1;)"#;
    let mut insp = inspector(rules, ids());
    let mut total = 0;
    for port in 1000..1005 {
        let p = Pkt::udp("10.0.0.1", port, "10.0.0.9", 53, b"x");
        let (run, _) = run_flow(&mut insp, &[p]);
        total += run.alerts.len();
    }
    assert_eq!(total, 2, "limit 2 per source, across flows");
    let p = Pkt::udp("10.0.0.2", 1000, "10.0.0.9", 53, b"x");
    let (run, _) = run_flow(&mut insp, &[p]);
    assert_eq!(run.alerts.len(), 1, "another source has its own count");
    assert_eq!(insp.counters().alerts_suppressed, 3);
}

#[test]
fn profiles_choose_signatures_per_flow() {
    let rules = r#"alert tcp any any -> any any (msg:"critical"; content:"EVIL"; priority:1; sid:1;)
alert tcp any any -> any any (msg:"minor"; content:"EVIL"; priority:3; sid:2;)
alert tcp any any -> any any (msg:"setter"; content:"LOGIN"; flowbits:set,in; priority:3; sid:3;)
alert tcp any any -> any any (msg:"needs setter"; content:"DROP TABLE"; flowbits:isset,in; priority:1; sid:4;)"#;
    let mut insp = Inspector::new(
        support::rules(rules),
        vec![ProfileSpec::full(), ProfileSpec::critical()],
        inline(),
    )
    .unwrap();
    assert_eq!(insp.profile("critical"), Some(ProfileId(1)));
    let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 80);
    let mut pkts = t.handshake();
    pkts.push(t.c(b"LOGIN EVIL DROP TABLE"));
    let (full, _) = run_flow_profile(&mut insp, &pkts, ProfileId(0));
    // Flowbit setters first, then readers, then by priority.
    assert_eq!(full.sids(), vec![3, 4, 1, 2]);
    let (critical, _) = run_flow_profile(&mut insp, &pkts, ProfileId(1));
    // sid 3 runs silently so that sid 4 keeps its meaning.
    assert_eq!(critical.sids(), vec![4, 1]);
}

#[test]
fn stream_memory_budget_and_depth_fall_back_to_packets_and_are_counted() {
    let small = Config {
        stream_memory: 16,
        inline_stream: true,
        ..Config::default()
    };
    let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 80);
    let mut pkts = t.handshake();
    pkts.push(t.c(b"0123456789"));
    pkts.push(t.c(b"0123456789 EVIL"));
    let mut insp = inspector(EVIL, small);
    let (run, flow) = run_flow(&mut insp, &pkts);
    assert_eq!(run.at(1), vec![4], "inspected as a packet");
    assert!(insp.counters().stream.memcap_refused >= 1);
    assert!(insp.counters().stream_fallback >= 1);
    assert_eq!(flow.stream_bytes(), 0);
    assert_eq!(insp.stream_memory_in_use(), 0, "the flush gave everything back");
    assert!(
        insp.memory_budget().used() <= 16,
        "spare kept by the worker, within the budget"
    );
    let shallow = Config {
        stream: palisade_inspect::stream::StreamLimits {
            depth: 8,
            ..Default::default()
        },
        inline_stream: true,
        ..Config::default()
    };
    let mut insp = inspector(EVIL, shallow);
    let (run, _) = run_flow(&mut insp, &pkts);
    assert_eq!(run.at(1), vec![4]);
}

#[test]
fn http_transactions_alert_once_each_whatever_the_segmentation() {
    let rules = r#"alert http any any -> any any (msg:"uri"; http.uri; content:"/admin"; sid:1;)
alert http any any -> any any (msg:"ua"; http.user_agent; content:"sqlmap"; nocase; sid:2;)
alert http any any -> any any (msg:"status"; http.stat_code; content:"500"; sid:3;)
alert http any any -> any any (msg:"host"; http.host; content:"example.org"; endswith; sid:4;)"#;
    let request: &[u8] = b"GET /admin/x HTTP/1.1\r\nHost: WWW.Example.ORG:8080\r\nUser-Agent: SQLMap/1.0\r\n\r\nGET /other HTTP/1.1\r\nHost: a\r\n\r\n";
    let response: &[u8] =
        b"HTTP/1.1 500 Err\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    for seg in [1, 3, 10, 1000] {
        for config in [ids(), inline()] {
            let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 80);
            let mut pkts = t.handshake();
            for c in request.chunks(seg) {
                pkts.push(t.c(c));
                pkts.push(t.ack_from_server());
            }
            for c in response.chunks(seg) {
                pkts.push(t.s(c));
                pkts.push(t.ack_from_client());
            }
            let mut insp = inspector(rules, config.clone());
            let (run, flow) = run_flow(&mut insp, &pkts);
            let mut sids = run.sids();
            sids.sort();
            assert_eq!(sids, vec![1, 2, 3, 4], "segments of {seg}, {config:?}");
            assert_eq!(flow.app_name(), Some("http"));
            assert!(run.raw.iter().all(|(_, a)| a.tx.is_some()));
        }
    }
}

#[test]
fn http_rules_need_http() {
    // Port 80 is not enough: the engine detects protocols by content.
    let rules = r#"alert http any any -> any any (http.uri; content:"/x"; sid:1;)"#;
    let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 80);
    let mut pkts = t.handshake();
    pkts.push(t.c(b"\x16\x03\x01\x00\x05/x/x/"));
    let mut insp = inspector(rules, inline());
    let (run, flow) = run_flow(&mut insp, &pkts);
    assert!(run.alerts.is_empty());
    assert_eq!(flow.app_name(), Some("tls"));
    // And any port works.
    let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 5555);
    let mut pkts = t.handshake();
    pkts.push(t.c(b"GET /x HTTP/1.0\r\n\r\n"));
    let (run, _) = run_flow(&mut insp, &pkts);
    assert_eq!(run.sids(), vec![1]);
}

#[test]
fn dns_queries_over_udp() {
    let rules = r#"alert dns any any -> any any (dns.query; content:"evil.example"; nocase; sid:1;)
alert udp any any -> any 53 (content:"|04|EVIL"; sid:2;)"#;
    let mut q = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["www", "EVIL", "example", "com"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let mut insp = inspector(rules, ids());
    let (run, flow) = run_flow(&mut insp, &[Pkt::udp("10.0.0.1", 5353, "10.0.0.53", 53, &q)]);
    assert_eq!(run.sids(), vec![1, 2], "a packet's alerts come in evaluation order");
    assert_eq!(flow.app_name(), Some("dns"));
}

#[test]
fn established_and_direction_keywords() {
    let rules = r#"alert tcp any any -> any any (msg:"est to server"; flow:established,to_server; sid:1;)
alert tcp any any -> any any (msg:"not est"; flow:not_established; sid:2;)
alert tcp any any -> any any (msg:"syn"; flags:S; sid:3;)
alert tcp any any -> any any (msg:"synack"; flags:SA; flow:to_client; sid:4;)"#;
    let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 80);
    let mut pkts = t.handshake();
    pkts.push(t.c(b"data"));
    pkts.push(t.ack_from_server());
    let mut insp = inspector(rules, ids());
    let (run, _) = run_flow(&mut insp, &pkts);
    assert_eq!(run.at(1), vec![3], "only the client's data packet after the handshake");
    assert_eq!(run.at(2), vec![0, 1, 2], "the handshake is not established");
    assert_eq!(run.at(3), vec![0]);
    assert_eq!(run.at(4), vec![1]);
}

#[test]
fn udp_is_established_once_both_directions_were_seen() {
    let rules = r#"alert udp any any -> any any (flow:established; sid:1;)"#;
    let mut insp = inspector(rules, ids());
    let a = Pkt::udp("10.0.0.1", 1000, "10.0.0.2", 2000, b"q");
    let b = Pkt::udp("10.0.0.2", 2000, "10.0.0.1", 1000, b"r");
    let (run, _) = run_flow(&mut insp, &[a.clone(), b, a]);
    assert_eq!(run.at(1), vec![1, 2]);
}

#[test]
fn ip_only_rules_alert_once_per_direction() {
    let rules = r#"alert ip 10.0.0.1 any -> any any (sid:1;)
alert ip any any <> 10.0.0.1 any (sid:2;)"#;
    let mut insp = inspector(rules, ids());
    let a = Pkt::udp("10.0.0.1", 1000, "10.0.0.2", 2000, b"q");
    let b = Pkt::udp("10.0.0.2", 2000, "10.0.0.1", 1000, b"r");
    let (run, _) = run_flow(&mut insp, &[a.clone(), a.clone(), b.clone(), b, a]);
    assert_eq!(run.at(1), vec![0]);
    assert_eq!(run.at(2), vec![0, 2]);
}

#[test]
fn icmp_types_and_related_errors() {
    let rules = r#"alert icmp any any -> any any (itype:8; icode:0; sid:1;)
drop udp any any -> any 514 (content:"x"; sid:2;)"#;
    let mut insp = inspector(rules, ips());
    let echo = Pkt::icmp("10.0.0.1", "10.0.0.2", 8, 0, b"ping");
    let reply = Pkt::icmp("10.0.0.2", "10.0.0.1", 0, 0, b"ping");
    let (run, _) = run_flow(&mut insp, &[echo, reply]);
    assert_eq!(run.at(1), vec![0]);
    // An ICMP error about a dropped UDP flow is dropped with it.
    let u = Pkt::udp("10.0.0.1", 1000, "10.0.0.2", 514, b"x");
    let mut flow = FlowState::new(ProfileId(0), &u.packet());
    let mut alerts = Vec::new();
    let o = insp.inspect(&mut flow, &u.packet(), Duration::ZERO, &mut alerts);
    assert!(matches!(o, Outcome::Drop(DropReason::Rules(_))));
    let err = Pkt::icmp("10.0.0.2", "10.0.0.1", 3, 3, b"quoted");
    let o = insp.inspect(&mut flow, &err.packet(), Duration::ZERO, &mut alerts);
    assert_eq!(o, Outcome::Drop(DropReason::FlowDrop));
}

#[test]
fn alerts_per_packet_are_capped_and_counted() {
    let rules: String = (1..=20)
        .map(|i| format!("alert udp any any -> any any (content:\"x\"; sid:{i};)\n"))
        .collect();
    let mut insp = inspector(&rules, ids());
    let (run, _) = run_flow(&mut insp, &[Pkt::udp("10.0.0.1", 1, "10.0.0.2", 2, b"x")]);
    assert_eq!(run.alerts.len(), 15);
    assert_eq!(insp.counters().alerts_discarded, 5);
}

#[test]
fn midstream_pickup_and_reversal() {
    let rules = r#"alert http any any -> any any (http.stat_code; content:"404"; sid:1;)
alert tcp any any -> any any (content:"needle"; sid:2;)"#;
    // The first packet seen is the server's response.
    let mut t = Tcp::new("10.0.0.2", 80, "10.0.0.1", 40000);
    let pkts = vec![
        t.c(b"HTTP/1.1 404 NF\r\nContent-Length: 6\r\n\r\nneedle"),
        t.ack_from_server(),
    ];
    for midstream in [false, true] {
        let mut insp = inspector(
            rules,
            Config {
                midstream,
                ..Config::default()
            },
        );
        let (run, flow) = run_flow(&mut insp, &pkts);
        if midstream {
            assert_eq!(run.at(1).len(), 1, "{run:?}");
            assert!(flow.reversed(), "the receiver of the first packet is the client");
            assert_eq!(flow.client().1, 40000);
            assert!(run.raw.iter().all(|(_, a)| a.direction == Direction::ToClient));
        } else {
            // Without midstream nothing is reassembled: the packet is inspected alone.
            assert_eq!(run.sids(), vec![2]);
        }
    }
}

#[test]
fn tcp_flags_on_the_wire_match_the_flags_keyword() {
    let rules = r#"alert tcp any any -> any any (flags:F+; sid:1;)
alert tcp any any -> any any (flags:R; sid:2;)"#;
    let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 80);
    let mut pkts = t.handshake();
    pkts.push(t.fin_from_client());
    pkts.push(t.rst_from_client());
    let mut insp = inspector(rules, ids());
    let (run, flow) = run_flow(&mut insp, &pkts);
    assert_eq!(run.at(1), vec![3]);
    assert_eq!(run.at(2), vec![4]);
    assert_eq!(flow.tcp_state(), Some(palisade_inspect::TcpState::Closed));
    let _ = tcp_flags::FIN;
}

#[test]
fn a_new_ruleset_resets_the_flows_detection_state() {
    let old = r#"alert tcp any any -> any any (content:"LOGIN"; flowbits:set,in; flowbits:noalert; sid:1;)
alert tcp any any -> any any (content:"x"; flowbits:isset,in; sid:2;)"#;
    // In the new rules, flowbit number 0 is another name: the old bit must not carry over.
    let new = r#"alert tcp any any -> any any (content:"zzz"; flowbits:set,other; sid:3;)
alert tcp any any -> any any (content:"x"; flowbits:isset,other; sid:4;)"#;
    let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 80);
    let mut pkts = t.handshake();
    pkts.push(t.c(b"LOGIN"));
    let mut a = inspector(old, inline());
    let mut flow = FlowState::new(ProfileId(0), &pkts[0].packet());
    let mut alerts = Vec::new();
    for p in &pkts {
        let _ = a.inspect(&mut flow, &p.packet(), Duration::ZERO, &mut alerts);
    }
    let mut b = inspector(new, inline());
    let x = t.c(b"x");
    let _ = b.inspect(&mut flow, &x.packet(), Duration::ZERO, &mut alerts);
    assert!(alerts.is_empty(), "{alerts:?}");
    assert_eq!(b.counters().ruleset_changes, 1);
    // A profile the inspector does not have is its first one, counted.
    let mut flow = FlowState::new(ProfileId(7), &x.packet());
    let _ = b.inspect(&mut flow, &x.packet(), Duration::ZERO, &mut alerts);
    assert_eq!(b.counters().unknown_profile, 1);
    assert_eq!(flow.profile(), ProfileId(0));
}

#[test]
fn application_records_once_per_transaction() {
    use palisade_inspect::app::AppRecord;
    let config = Config {
        app_logs: true,
        ..ids()
    };
    let mut insp = inspector(r#"alert tcp any any -> any any (content:"zzz"; sid:1;)"#, config);
    let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 80);
    let mut pkts = t.handshake();
    pkts.push(t.c(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n"));
    pkts.push(t.s(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"));
    pkts.push(t.ack_from_client());
    let (_, _) = run_flow(&mut insp, &pkts);
    let logs: Vec<AppRecord> = insp.app_logs().drain(..).collect();
    let urls: Vec<(Vec<u8>, Option<Vec<u8>>)> = logs
        .iter()
        .map(|r| match r {
            AppRecord::Http { url, status, .. } => (url.clone(), status.clone()),
            other => panic!("{other:?}"),
        })
        .collect();
    // The answered one when its response completed, the other when the flow ended.
    assert_eq!(
        urls,
        vec![(b"/a".to_vec(), Some(b"200".to_vec())), (b"/b".to_vec(), None)]
    );
}

/// What the datapath's workers need: an inspector per worker (Send), flow
/// state moving with connections (Send), compiled rules shared (Sync).
#[test]
fn thread_bounds_for_workers() {
    fn send<T: Send>() {}
    fn sync<T: Sync + Send>() {}
    send::<Inspector>();
    send::<FlowState>();
    sync::<palisade_inspect::RuleSet>();
    sync::<palisade_inspect::Detector>();
    sync::<palisade_inspect::stream::MemoryBudget>();
    // Two workers sharing compiled profiles and one memory budget.
    let rules = support::rules(EVIL);
    let detectors = Inspector::compile(&rules, vec![ProfileSpec::full()]).unwrap();
    let budget = palisade_inspect::stream::MemoryBudget::new(1 << 20);
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let mut insp = Inspector::shared(rules.clone(), detectors.clone(), inline(), budget.clone());
            std::thread::spawn(move || {
                let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 80);
                let mut pkts = t.handshake();
                pkts.push(t.c(b"EVIL"));
                let (run, _) = run_flow(&mut insp, &pkts);
                run.alerts.len()
            })
        })
        .collect();
    for w in workers {
        assert_eq!(w.join().unwrap(), 1);
    }
}

/// A segment with a wrong TCP checksum (found by suricata-verify bug-1045):
/// the receiver discards it, so it stays out of the stream, and it is still
/// inspected as a packet, as Suricata does. Before the fix every such packet
/// was dropped from inspection altogether.
#[test]
fn bad_checksum_segments_are_inspected_as_packets_not_reassembled() {
    let rules = r#"alert tcp any any -> any any (flow:to_server,established; content:"EHLO"; sid:1;)"#;
    let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 25);
    let mut pkts = t.handshake();
    let mut bad = t.c(b"EHLO x\r\n");
    bad.bad_checksum = true;
    pkts.push(bad);
    pkts.push(t.ack_from_server());
    let mut insp = inspector(rules, ids());
    let (run, flow) = run_flow(&mut insp, &pkts);
    assert_eq!(run.at(1), vec![3], "inspected on its own packet");
    assert_eq!(flow.stream_bytes(), 0);
    assert_eq!(
        insp.counters().stream_fallback,
        0,
        "not a fallback: never offered to the stream"
    );
}

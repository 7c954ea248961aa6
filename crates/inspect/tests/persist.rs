//! A flow's inspection state carried to another inspector (live migration,
//! `palisade_inspect::persist`): the flow cut at every packet, its first
//! part inspected by one inspector, its state exported and imported into a
//! second one (its own ruleset, compiled apart), the rest inspected there,
//! gives the same outcomes and alerts as the uncut flow through one
//! inspector. And hostile records are refused with an error naming the
//! field, never a panic.

mod support;

use std::time::Duration;

use palisade_inspect::persist::{FlowImporter, PersistError};
use palisade_inspect::{Config, FlowState, FlowVerdict, Inspector, Mode, Outcome, ProfileId};
use support::*;

/// The agent's settings: IPS, stream data inspected as it arrives, midstream pick-up.
fn inline() -> Config {
    Config {
        mode: Mode::Ips,
        inline_stream: true,
        midstream: true,
        ..Config::default()
    }
}

const RULES: &str = r#"alert tcp any any -> any any (msg:"split"; content:"evilpayload"; sid:2;)
alert tcp any any -> any any (msg:"login"; flow:to_server; content:"LOGIN"; flowbits:set,logged; flowbits:noalert; sid:3;)
alert tcp any any -> any any (msg:"secret after login"; content:"SECRET"; flowbits:isset,logged; sid:4;)
alert tcp any any -> any any (msg:"ping once"; content:"ping"; threshold:type limit, track by_flow, count 1, seconds 60; sid:5;)
alert http any any -> any any (msg:"header"; http.header; content:"x-token|3a 20|evil"; sid:6;)
alert http any any -> any any (msg:"second"; http.uri; content:"/second"; sid:7;)
alert http any any -> any any (msg:"uri"; http.uri; content:"/evil"; sid:8;)
drop tcp any any -> any any (msg:"drop"; content:"DROPME"; sid:9;)
alert dns any any -> any any (msg:"dns"; dns.query; content:"evil"; sid:10;)
alert tls any any -> any any (msg:"sni"; tls.sni; content:"evil.example"; sid:11;)"#;

/// The same rules numbered differently (another rule first, flowbit names
/// met in another order): what the destination may have compiled.
fn renumbered() -> String {
    format!(
        "alert tcp any any -> any any (msg:\"never\"; content:\"|00 01 02 03 04 05 06 07|\"; flowbits:set,other; sid:99;)\n{}",
        RULES.lines().rev().collect::<Vec<_>>().join("\n")
    )
}

/// Outcomes and (packet, sid) alerts of a run.
type Trace = (Vec<Outcome>, Vec<(usize, u32)>);

fn step(insp: &mut Inspector, flow: &mut FlowState, p: &Pkt, i: usize, trace: &mut Trace) {
    let mut alerts = Vec::new();
    let o = insp.inspect(flow, &p.packet(), Duration::from_secs(i as u64), &mut alerts);
    trace.0.push(o);
    for a in alerts {
        trace.1.push((i, insp.rules().get(a.sig).rule.sid));
    }
}

fn finish(insp: &mut Inspector, flow: &mut FlowState, n: usize, trace: &mut Trace) {
    let mut alerts = Vec::new();
    let _ = insp.flush(flow, Duration::from_secs(n as u64), &mut alerts);
    for a in alerts {
        trace.1.push((usize::MAX, insp.rules().get(a.sig).rule.sid));
    }
    assert_eq!(flow.stream_bytes(), 0);
}

fn uncut(packets: &[Pkt]) -> Trace {
    let mut insp = inspector(RULES, inline());
    let mut flow = FlowState::new(ProfileId(0), &packets[0].packet());
    let mut trace = (Vec::new(), Vec::new());
    for (i, p) in packets.iter().enumerate() {
        step(&mut insp, &mut flow, p, i, &mut trace);
    }
    finish(&mut insp, &mut flow, packets.len(), &mut trace);
    // Alerts of one packet come in the order of the signatures' numbers, which differ between rulesets.
    trace.1.sort_unstable();
    trace
}

/// Packets before `cut` on one inspector, the rest on another that imported the flow.
fn migrated(packets: &[Pkt], cut: usize, destination_rules: &str) -> (Trace, Inspector, usize) {
    let mut source = inspector(RULES, inline());
    let mut flow = FlowState::new(ProfileId(0), &packets[0].packet());
    let mut trace = (Vec::new(), Vec::new());
    for (i, p) in packets[..cut].iter().enumerate() {
        step(&mut source, &mut flow, p, i, &mut trace);
    }
    let mut record = Vec::new();
    let at = Duration::from_secs(cut as u64);
    source.export_flow(&flow, at, &mut record);
    let mut dest = inspector(destination_rules, inline());
    let importer: FlowImporter = dest.flow_importer();
    let imported = dest.import_flow(&importer, &record, at).unwrap();
    assert_eq!(imported.profile, Some(ProfileId(0)));
    assert_eq!(imported.profile_name, "full");
    assert!(!imported.resumed_midstream, "cut {cut}: everything is carried");
    assert_eq!(imported.unknown_refs, 0);
    assert_eq!(dest.stream_memory_in_use(), flow.stream_bytes());
    let mut flow = imported.flow;
    for (i, p) in packets.iter().enumerate().skip(cut) {
        step(&mut dest, &mut flow, p, i, &mut trace);
    }
    finish(&mut dest, &mut flow, packets.len(), &mut trace);
    assert_eq!(dest.stream_memory_in_use(), 0);
    trace.1.sort_unstable();
    (trace, dest, record.len())
}

/// Every cut of `packets` behaves as the uncut flow, under the same rules
/// and under the same rules numbered differently. Returns the uncut trace.
fn same_at_every_cut(packets: &[Pkt]) -> Trace {
    let want = uncut(packets);
    let renumbered = renumbered();
    for cut in 0..=packets.len() {
        for rules in [RULES, renumbered.as_str()] {
            let (got, dest, _) = migrated(packets, cut, rules);
            assert_eq!(got, want, "cut before packet {cut}");
            let c = dest.counters();
            assert_eq!((c.flows_imported, c.imported_midstream), (1, 0));
        }
    }
    want
}

fn sids(t: &Trace) -> Vec<u32> {
    t.1.iter().map(|a| a.1).collect()
}

#[test]
fn a_signature_split_across_the_switchover_still_matches() {
    let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 80);
    let mut pkts = t.handshake();
    pkts.push(t.c(b"xx evilpa"));
    pkts.push(t.c(b"yload yy"));
    pkts.push(t.ack_from_server());
    let want = same_at_every_cut(&pkts);
    assert_eq!(sids(&want), vec![2]);
    assert_eq!(want.1[0].0, 4, "on the second half");
}

#[test]
fn out_of_order_bytes_held_at_the_switchover_are_carried() {
    let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 80);
    let mut pkts = t.handshake();
    // The second half first: held out of order until the first arrives.
    pkts.push(t.c_at(5, b"payload!"));
    pkts.push(t.c_at(0, b"evil "));
    t.advance_client(13);
    pkts.push(t.c_at(0, b"evil"));
    t.advance_client(4);
    pkts.push(t.ack_from_server());
    // "evil payload!" has no "evilpayload"; the test is that nothing differs.
    same_at_every_cut(&pkts);
    let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 80);
    let mut pkts = t.handshake();
    pkts.push(t.c_at(4, b"payload"));
    pkts.push(t.c_at(0, b"evil"));
    t.advance_client(11);
    pkts.push(t.ack_from_server());
    let want = same_at_every_cut(&pkts);
    assert_eq!(sids(&want), vec![2]);
}

#[test]
fn a_flowbit_set_before_gates_a_rule_after() {
    let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 80);
    let mut pkts = t.handshake();
    pkts.push(t.c(b"LOGIN bob"));
    pkts.push(t.s(b"ok"));
    pkts.push(t.c(b"get SECRET"));
    let want = same_at_every_cut(&pkts);
    assert_eq!(sids(&want), vec![4]);
}

#[test]
fn a_per_flow_threshold_does_not_alert_again_after_the_switchover() {
    let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 80);
    let mut pkts = t.handshake();
    for _ in 0..4 {
        pkts.push(t.c(b"ping"));
        pkts.push(t.s(b"pong"));
    }
    let want = same_at_every_cut(&pkts);
    assert_eq!(sids(&want), vec![5], "limit 1 per flow, however it is cut");
}

#[test]
fn a_dropped_flow_stays_dropped() {
    let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 80);
    let mut pkts = t.handshake();
    pkts.push(t.c(b"DROPME"));
    pkts.push(t.c(b"more"));
    pkts.push(t.s(b"reply"));
    let want = same_at_every_cut(&pkts);
    assert!(matches!(want.0[4], Outcome::Drop(_)));
    assert!(want.0[5..].iter().all(|o| matches!(o, Outcome::Drop(_))));
}

#[test]
fn http1_transactions_are_not_judged_twice() {
    let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 80);
    let mut pkts = t.handshake();
    pkts.push(t.c(b"GET /ev"));
    pkts.push(t.c(b"il HTTP/1.1\r\nHo"));
    pkts.push(t.c(b"st: a\r\n\r\n"));
    pkts.push(t.s(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab"));
    pkts.push(t.s(b"cd"));
    pkts.push(t.c(b"GET /second HTTP/1.1\r\nHost: a\r\n\r\n"));
    let want = same_at_every_cut(&pkts);
    assert_eq!(sids(&want), vec![8, 7]);
}

/// HPACK: the second request's headers refer to entries the first one
/// added to the dynamic table; cut between them, they still decode.
#[test]
fn http2_headers_decode_against_the_table_built_before_the_switchover() {
    let frame = |ty: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[ty, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    let mut first = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    first.extend(frame(4, 0, 0, b""));
    // GET http / with :authority "h" and x-token "evil", both indexed into the table.
    let mut block = vec![0x82, 0x86, 0x84, 0x41, 1, b'h', 0x40, 7];
    block.extend_from_slice(b"x-token");
    block.push(4);
    block.extend_from_slice(b"evil");
    first.extend(frame(1, 0x05, 1, &block));
    // GET /second, then the table's two entries by index only.
    let mut block = vec![0x82, 0x86, 0x04, 7];
    block.extend_from_slice(b"/second");
    block.extend_from_slice(&[0xbe, 0xbf]);
    let second = frame(1, 0x05, 3, &block);
    let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 80);
    let mut pkts = t.handshake();
    pkts.push(t.c(&first));
    pkts.push(t.ack_from_server());
    pkts.push(t.c(&second));
    let want = same_at_every_cut(&pkts);
    assert!(sids(&want).contains(&7), "{want:?}");
    assert_eq!(sids(&want).iter().filter(|&&s| s == 6).count(), 2, "{want:?}");
}

#[test]
fn tls_client_hello_split_across_the_switchover() {
    let sni = b"evil.example";
    let mut ext = vec![0, 0];
    ext.extend_from_slice(&((sni.len() + 5) as u16).to_be_bytes());
    ext.extend_from_slice(&((sni.len() + 3) as u16).to_be_bytes());
    ext.push(0);
    ext.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    ext.extend_from_slice(sni);
    let mut hello = vec![3, 3];
    hello.extend_from_slice(&[7; 32]);
    hello.push(0);
    hello.extend_from_slice(&[0, 2, 0x13, 0x01, 1, 0]);
    hello.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    hello.extend_from_slice(&ext);
    let mut hs = vec![1];
    hs.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&hello);
    let mut rec = vec![0x16, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 443);
    let mut pkts = t.handshake();
    let (a, b) = rec.split_at(30);
    pkts.push(t.c(a));
    pkts.push(t.c(b));
    let want = same_at_every_cut(&pkts);
    assert_eq!(sids(&want), vec![11]);
}

#[test]
fn dns_over_udp_and_tcp() {
    let mut q = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 4];
    q.extend_from_slice(b"evil");
    q.extend_from_slice(&[3, b'c', b'o', b'm', 0, 0, 1, 0, 1]);
    let mut answer = q.clone();
    answer[2..4].copy_from_slice(&[0x81, 0x80]);
    let pkts = vec![
        Pkt::udp("10.0.0.1", 5353, "10.0.0.2", 53, &q),
        Pkt::udp("10.0.0.2", 53, "10.0.0.1", 5353, &answer),
    ];
    assert_eq!(sids(&same_at_every_cut(&pkts)), vec![10]);
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 53);
    let mut pkts = t.handshake();
    let (a, b) = framed.split_at(9);
    pkts.push(t.c(a));
    pkts.push(t.c(b));
    assert_eq!(sids(&same_at_every_cut(&pkts)), vec![10]);
}

/// A record of a TCP flow after its handshake, nothing matched: no
/// flowbits, thresholds or transactions, so its fields sit at fixed offsets.
fn plain_record() -> Vec<u8> {
    let mut insp = inspector(RULES, inline());
    let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 80);
    let pkts = t.handshake();
    let mut flow = FlowState::new(ProfileId(0), &pkts[0].packet());
    let mut trace = (Vec::new(), Vec::new());
    for (i, p) in pkts.iter().enumerate() {
        step(&mut insp, &mut flow, p, i, &mut trace);
    }
    let mut r = Vec::new();
    insp.export_flow(&flow, Duration::from_secs(3), &mut r);
    r
}

// Offsets in `plain_record`: magic 0, version 4, profile "full" 6, protocol
// 11, client 12, server 19, flags 26, verdict 27, counts 28, flowbits 60,
// thresholds 62, transactions 64, tcp 66, state 67, tcp flags 68, the
// client's stream 69 (base 70, data start 74, next 82, acked 90, flags 98).
#[test]
fn hostile_records_are_refused_naming_the_field() {
    let good = plain_record();
    let mut insp = inspector(RULES, inline());
    let importer = insp.flow_importer();
    assert!(insp.import_flow(&importer, &good, Duration::ZERO).is_ok());
    let set = |at: usize, bytes: &[u8]| {
        let mut r = good.clone();
        r[at..at + bytes.len()].copy_from_slice(bytes);
        r
    };
    // (what, record, the refusal expected)
    type Case = (&'static str, Vec<u8>, fn(&PersistError) -> bool);
    let cases: Vec<Case> = vec![
        ("empty", Vec::new(), |e| {
            matches!(
                e,
                PersistError::Truncated {
                    field: "magic",
                    offset: 0,
                    ..
                }
            )
        }),
        ("bad magic", set(0, b"XXXX"), |e| *e == PersistError::BadMagic),
        ("next version", set(4, &[0, 2]), |e| {
            *e == PersistError::UnknownVersion { found: 2 }
        }),
        ("address family", set(12, &[5]), |e| {
            matches!(
                e,
                PersistError::BadValue {
                    field: "client",
                    offset: 12,
                    value: 5
                }
            )
        }),
        ("undefined flag", set(26, &[0x10]), |e| {
            matches!(
                e,
                PersistError::BadValue {
                    field: "flow flags",
                    offset: 26,
                    ..
                }
            )
        }),
        ("verdict", set(27, &[3]), |e| {
            matches!(
                e,
                PersistError::BadValue {
                    field: "verdict",
                    offset: 27,
                    value: 3
                }
            )
        }),
        ("tcp code", set(66, &[3]), |e| {
            matches!(
                e,
                PersistError::BadValue {
                    field: "tcp",
                    offset: 66,
                    ..
                }
            )
        }),
        ("tcp state", set(67, &[6]), |e| {
            matches!(
                e,
                PersistError::BadValue {
                    field: "tcp state",
                    offset: 67,
                    ..
                }
            )
        }),
        ("data start after next", set(74, &5u64.to_be_bytes()), |e| {
            matches!(
                e,
                PersistError::Inconsistent {
                    field: "stream data start",
                    offset: 74,
                    ..
                }
            )
        }),
        ("offset beyond 2^62", set(82, &u64::MAX.to_be_bytes()), |e| {
            matches!(
                e,
                PersistError::TooLong {
                    field: "stream next",
                    offset: 82,
                    ..
                }
            )
        }),
        (
            "trailing byte",
            {
                let mut r = good.clone();
                r.push(0);
                r
            },
            |e| *e == PersistError::Trailing(1),
        ),
    ];
    for (what, record, ok) in cases {
        let before = insp.counters().flows_imported;
        let e = insp.import_flow(&importer, &record, Duration::ZERO).unwrap_err();
        assert!(ok(&e), "{what}: {e:?}");
        assert!(!e.to_string().is_empty());
        assert_eq!(
            insp.counters().flows_imported,
            before,
            "{what}: a refusal imports nothing"
        );
    }
    // Every cut of a real record is refused, as truncated.
    for n in 0..good.len() {
        let e = insp.import_flow(&importer, &good[..n], Duration::ZERO).unwrap_err();
        assert!(matches!(e, PersistError::Truncated { .. }), "cut at {n}: {e:?}");
    }
    assert_eq!(insp.stream_memory_in_use(), 0);
}

#[test]
fn an_unknown_profile_is_named_and_left_to_the_caller() {
    let good = plain_record();
    let mut dest = Inspector::new(rules(RULES), vec![palisade_inspect::ProfileSpec::critical()], inline()).unwrap();
    let importer = dest.flow_importer();
    let imported = dest.import_flow(&importer, &good, Duration::ZERO).unwrap();
    assert_eq!(imported.profile, None);
    assert_eq!(imported.profile_name, "full");
}

#[test]
fn held_bytes_beyond_the_destinations_limits_resume_mid_stream() {
    let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 80);
    let mut pkts = t.handshake();
    pkts.push(t.c_at(4, b"payload"));
    let mut source = inspector(RULES, inline());
    let mut flow = FlowState::new(ProfileId(0), &pkts[0].packet());
    let mut trace = (Vec::new(), Vec::new());
    for (i, p) in pkts.iter().enumerate() {
        step(&mut source, &mut flow, p, i, &mut trace);
    }
    assert!(flow.stream_bytes() > 0);
    let mut record = Vec::new();
    source.export_flow(&flow, Duration::from_secs(4), &mut record);
    let tiny = Config {
        stream_memory: 2,
        ..inline()
    };
    let mut dest = inspector(RULES, tiny);
    let importer = dest.flow_importer();
    let imported = dest.import_flow(&importer, &record, Duration::from_secs(4)).unwrap();
    assert!(imported.resumed_midstream);
    assert_eq!(imported.flow.stream_bytes(), 0);
    assert_eq!(imported.flow.verdict(), FlowVerdict::Inspect);
    assert_eq!(dest.counters().imported_midstream, 1);
    assert_eq!(dest.stream_memory_in_use(), 0);
}

/// What a migration's pause carries per inspected flow: the record of an
/// HTTP/1 flow between requests (printed; figures go in the report).
#[test]
fn record_sizes() {
    let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 80);
    let mut pkts = t.handshake();
    pkts.push(t.c(b"GET /index.html HTTP/1.1\r\nHost: example.com\r\nUser-Agent: curl\r\n\r\n"));
    pkts.push(t.s(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"));
    let (_, _, http) = migrated(&pkts, pkts.len(), RULES);
    let (_, _, handshake) = migrated(&pkts, 3, RULES);
    eprintln!("record bytes: TCP after its handshake {handshake}, HTTP/1 after one exchange {http}");
    assert!(handshake < http);
}

/// Seeds for the `inspect_persist` fuzz target: with
/// `PALISADE_PERSIST_SEEDS=DIR`, the records of this file's flows cut
/// mid-way, in the target's record mode (first byte odd; with bit 1 the
/// target writes the header itself). Without it, nothing.
#[test]
fn write_fuzz_seeds_when_asked() {
    let Some(dir) = std::env::var_os("PALISADE_PERSIST_SEEDS") else {
        return;
    };
    let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 80);
    let mut http = t.handshake();
    http.push(t.c(b"GET /ev"));
    http.push(t.c_at(30, b"later"));
    http.push(t.c(b"il HTTP/1.1\r\nHost: a\r\n\r\nLOGIN ping"));
    let mut t = Tcp::new("10.0.0.1", 40000, "10.0.0.2", 80);
    let mut h2 = t.handshake();
    h2.push(t.c(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00\x0d\x01\x05\x00\x00\x00\x01\x82\x86\x04\x02/x\x40\x03x-h\x04evil"));
    for (n, packets) in [http, h2].iter().enumerate() {
        let mut insp = inspector(RULES, inline());
        let mut flow = FlowState::new(ProfileId(0), &packets[0].packet());
        let mut trace = (Vec::new(), Vec::new());
        for (i, p) in packets.iter().enumerate() {
            step(&mut insp, &mut flow, p, i, &mut trace);
        }
        let mut r = Vec::new();
        insp.export_flow(&flow, Duration::from_secs(9), &mut r);
        let mut raw = vec![1];
        raw.extend_from_slice(&r);
        std::fs::write(std::path::Path::new(&dir).join(format!("record-{n}")), raw).unwrap();
        let mut headless = vec![3];
        headless.extend_from_slice(&r[11..]);
        std::fs::write(std::path::Path::new(&dir).join(format!("headless-{n}")), headless).unwrap();
    }
}

//! Table-driven tests of the rule parser.

use super::*;

fn ctx() -> RuleContext {
    RuleContext::default()
}

fn parse(text: &str) -> Rule {
    parse_rule(text, &ctx()).unwrap_or_else(|e| panic!("{text}\n  -> {e}"))
}

#[test]
fn headers() {
    let r = parse(r#"alert tcp $HOME_NET any -> $EXTERNAL_NET [80,443] (msg:"m"; sid:7; rev:2;)"#);
    assert_eq!(r.action, Action::Alert);
    assert_eq!(r.protocol, Protocol::Tcp);
    assert!(r.src.contains("10.1.1.1".parse().unwrap()));
    assert!(!r.dst.contains("10.1.1.1".parse().unwrap()));
    assert!(r.dst_ports.contains(443) && !r.dst_ports.contains(8080));
    assert!(r.header_has_negation, "$EXTERNAL_NET is a negation");
    assert_eq!((r.sid, r.rev, r.gid, r.msg.as_str()), (7, 2, 1, "m"));
    let r = parse("drop udp any :1024 <> 10.0.0.0/8 0 (sid:1;)");
    assert!(r.bidirectional && r.src_ports.contains(1024) && !r.src_ports.contains(1025));
    assert!(!r.header_has_negation);
    for (proto, want) in [
        ("ip", Protocol::Ip),
        ("icmp", Protocol::Icmp),
        ("http", Protocol::App(AppProto::Http)),
        ("tls", Protocol::App(AppProto::Tls)),
        ("dns", Protocol::App(AppProto::Dns)),
    ] {
        assert_eq!(
            parse(&format!("pass {proto} any any -> any any (sid:1;)")).protocol,
            want
        );
    }
}

#[test]
fn payload_keywords_group_by_buffer_in_order() {
    let r = parse(
        r#"alert tcp any any -> any any (content:"foo"; http_uri; content:"bar"; nocase; depth:10; offset:2; content:"baz"; distance:1; within:8; http.host; content:"x.org"; endswith; sid:1;)"#,
    );
    assert_eq!(r.app_proto(), Some(AppProto::Http));
    let uri = r.buffer(Buffer::HttpUri).unwrap();
    assert_eq!(uri.steps.len(), 1);
    let payload = r.buffer(Buffer::Payload).unwrap();
    let Step::Content(bar) = &payload.steps[0] else {
        panic!()
    };
    assert!(bar.nocase && bar.depth == Some(10) && bar.offset == 2 && !bar.is_relative());
    let Step::Content(baz) = &payload.steps[1] else {
        panic!()
    };
    assert_eq!((baz.distance, baz.within), (Some(1), Some(8)));
    let host = r.buffer(Buffer::HttpHost).unwrap();
    let Step::Content(h) = &host.steps[0] else { panic!() };
    assert!(h.endswith);
    assert_eq!(
        r.buffers.iter().map(|b| b.buffer).collect::<Vec<_>>(),
        vec![Buffer::HttpUri, Buffer::Payload, Buffer::HttpHost]
    );
}

#[test]
fn relative_isdataat_and_pcre_follow_the_previous_match() {
    let r = parse(r#"alert tcp any any -> any any (uricontent:"fix"; isdataat:4,relative; pcre:"/x/R"; sid:1;)"#);
    let uri = r.buffer(Buffer::HttpUri).unwrap();
    assert_eq!(uri.steps.len(), 3);
    assert!(r.buffer(Buffer::Payload).is_none());
    let r = parse(r#"alert tcp any any -> any any (content:"a"; isdataat:!10; sid:1;)"#);
    assert_eq!(r.buffer(Buffer::Payload).unwrap().steps.len(), 2);
}

#[test]
fn packet_keywords() {
    let r = parse("alert tcp any any -> any any (flags:SA,CE; dsize:>10; ttl:<64; sid:1;)");
    assert_eq!(
        r.packet,
        vec![
            PacketCheck::Flags(FlagsMatch {
                mode: FlagsMode::Exact,
                flags: 0x12,
                ignore: 0xc0
            }),
            PacketCheck::Dsize(UintMatch::Gt(10)),
            PacketCheck::Ttl(UintMatch::Lt(64)),
        ]
    );
    let r = parse("alert icmp any any -> any any (itype:7<>20; icode:0; ip_proto:!tcp; sid:1;)");
    assert_eq!(r.packet[0], PacketCheck::Itype(UintMatch::Between(7, 20)));
    assert_eq!(r.packet[2], PacketCheck::IpProto(UintMatch::Ne(6)));
    let f = FlagsMatch {
        mode: FlagsMode::Exact,
        flags: 0x12,
        ignore: 0xc0,
    };
    assert!(f.matches(0x12) && f.matches(0x12 | 0x40) && !f.matches(0x13));
    let plus = FlagsMatch {
        mode: FlagsMode::All,
        flags: 0x02,
        ignore: 0,
    };
    assert!(plus.matches(0x12) && !plus.matches(0x10));
    let not = FlagsMatch {
        mode: FlagsMode::Not,
        flags: 0x04,
        ignore: 0,
    };
    assert!(not.matches(0x10) && !not.matches(0x14));
}

#[test]
fn flow_flowbits_thresholds() {
    let r = parse(
        "alert tcp any any -> any 25 (flow:to_server,established; flowbits:isset,a|b; flowbits:set,c; flowbits:noalert; threshold:type limit, track by_src, count 5, seconds 60; sid:1;)",
    );
    assert!(r.flow.to_server && r.flow.established);
    assert_eq!(
        r.flowbits,
        vec![Flowbit::IsSet(vec!["a".into(), "b".into()]), Flowbit::Set("c".into())]
    );
    assert!(r.noalert);
    assert_eq!(
        r.threshold,
        Some(Threshold {
            kind: ThresholdKind::Limit,
            track: Track::BySrc,
            count: 5,
            seconds: 60
        })
    );
    let r = parse("alert icmp any any -> any any (detection_filter:track by_flow, count 2, seconds 10; sid:1;)");
    assert_eq!(r.detection_filter.unwrap().kind, ThresholdKind::DetectionFilter);
}

#[test]
fn continued_lines_and_comments() {
    let text = "# comment\n\nalert dns any any -> any 53 ( \\\nmsg:\"x\"; \\\ncontent:\"|04|ddns\"; \\\nsid:1; rev:1;)\n#alert tcp any any -> any any (sid:2;)\n";
    let parsed = parse_rules(text, &ctx());
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    assert_eq!(parsed.rules.len(), 1);
    assert_eq!(parsed.rules[0].line, 3);
}

#[test]
fn refusals_name_keyword_and_column() {
    // (rule, keyword, column)
    let cases: &[(&str, Option<&str>, usize)] = &[
        (
            "alert tcp any any -> any any (sid:1; byte_test:1,=,1,0;)",
            Some("byte_test"),
            38,
        ),
        (
            "alert tcp any any -> any any (content:\"a\"; depth:0; sid:1;)",
            Some("depth"),
            44,
        ),
        ("alert tcp any any -> any any (nocase; sid:1;)", Some("nocase"), 31),
        (
            "alert tcp any any -> any any (content:\"ab|4\"; sid:1;)",
            Some("content"),
            42,
        ),
        ("alert tcp any any -> any any (content:\"a\"; sid:1)", Some("sid"), 44),
        ("alert tcp any any -> any any (msg:\"no sid\";)", None, 31),
        ("alert foo any any -> any any (sid:1;)", None, 7),
        ("bark tcp any any -> any any (sid:1;)", None, 1),
        ("alert tcp any any <- any any (sid:1;)", None, 19),
        ("alert tcp 10.0.0.300 any -> any any (sid:1;)", None, 11),
        (
            "alert tcp any any -> any any (pcre:\"/(a)\\1/\"; sid:1;)",
            Some("pcre"),
            41,
        ),
        (
            "alert tcp any any -> any any (content:\"a\"; distance:1; depth:4; sid:1;)",
            None,
            31,
        ),
        ("alert tcp any any -> any any (flow:sideways; sid:1;)", Some("flow"), 31),
        (
            "alert tcp any any -> any any (classtype:nope; sid:1;)",
            Some("classtype"),
            31,
        ),
        (
            "alert udp any any -> any any (http.uri; content:\"a\"; sid:1;)",
            Some("http.uri"),
            31,
        ),
        (
            "alert tls any any -> any any (http.uri; content:\"a\"; sid:1;)",
            Some("http.uri"),
            31,
        ),
        ("alert tcp any any -> any any (bsize:1; sid:1;)", Some("bsize"), 31),
        (
            "alert tcp any any -> any any (content:\"abc\"; within:2; sid:1;)",
            Some("within"),
            46,
        ),
        ("alert tcp any any -> any any (sid:1; sid:2;)", Some("sid"), 38),
        ("alert tcp any any -> any any (sid:1;; rev:1;)", None, 37),
        ("alert tcp any any -> any any (sid:1;", None, 37),
        ("alert tcp any any -> any any", None, 29),
        ("alert tcp any any any -> any any (sid:1;)", None, 30),
    ];
    for (text, keyword, column) in cases {
        let e = parse_rule(text, &ctx()).expect_err(text);
        assert_eq!(e.keyword.as_deref(), *keyword, "{text}: {e}");
        assert_eq!((e.line, e.column), (1, *column), "{text}: {e}");
    }
}

#[test]
fn a_file_with_bad_rules_keeps_the_good_ones_and_says_where_the_bad_ones_are() {
    let text = "alert tcp any any -> any any (sid:1;)\n  alert tcp any any -> any any (sid:2; lua:x.lua;)\nalert tcp any any -> any any (content:\"x\";\\\n  nocase; sid:3; depth:0;)\n";
    let parsed = parse_rules(text, &ctx());
    assert_eq!(parsed.rules.iter().map(|r| r.sid).collect::<Vec<_>>(), vec![1]);
    assert_eq!(parsed.errors.len(), 2);
    assert_eq!((parsed.errors[0].line, parsed.errors[0].column), (2, 40));
    assert!(parsed.errors[0].is_unsupported());
    assert_eq!((parsed.errors[1].line, parsed.errors[1].column), (4, 18));
    assert_eq!(parsed.errors[1].keyword.as_deref(), Some("depth"));
}

//! Properties the fuzz targets check (`fuzz/fuzz_targets/inspect_*.rs`
//! include this file), and that the normal tests run on committed crash
//! inputs and on generated ones.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use palisade_inspect::app::dns::DnsParser;
use palisade_inspect::app::hpack::Decoder;
use palisade_inspect::app::http::{HttpParser, HttpTx, MAX_TXS};
use palisade_inspect::app::http2::Http2Parser;
use palisade_inspect::app::tls::TlsParser;
use palisade_inspect::packet::{Packet, TcpHeader, Transport};
use palisade_inspect::rules::{RuleContext, parse_rules};
use palisade_inspect::stream::{LocalBudget, MemoryBudget, StreamLimits};
use palisade_inspect::{Config, FlowState, Inspector, LoadOptions, Mode, ProfileSpec, RuleSet};

/// Rule text: parsing never panics, errors point inside the text, and the
/// accepted rules compile into a profile.
pub fn rules(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if text.len() > 64 * 1024 {
        return;
    }
    let ctx = RuleContext::default();
    let parsed = parse_rules(text, &ctx);
    let lines = text.split('\n').count();
    for e in &parsed.errors {
        assert!(e.line >= 1 && e.line <= lines, "{e} (text has {lines} lines)");
        assert!(e.column >= 1, "{e}");
        let _ = e.to_string();
    }
    let set = RuleSet::parse(text, &ctx, LoadOptions { skip_invalid: true }).expect("skip_invalid always loads");
    assert_eq!(
        set.len() + set.refused().len(),
        parsed.rules.len() + parsed.errors.len()
    );
    let insp = Inspector::new(
        Arc::new(set),
        vec![ProfileSpec::full(), ProfileSpec::critical()],
        Config::default(),
    )
    .expect("built-in profiles compile");
    // Every accepted signature runs on a few buffers without panicking.
    let mut i = insp;
    let mut flow = FlowState::new(palisade_inspect::ProfileId(0), &udp(b"x").packet());
    let mut alerts = Vec::new();
    for payload in [&b""[..], b"GET / HTTP/1.1\r\n\r\n", data] {
        let p = udp(payload);
        let _ = i.inspect(&mut flow, &p.packet(), Duration::ZERO, &mut alerts);
    }
}

/// `threshold.config` text: parsing never panics, a refusal points inside
/// the text, and what parses applies to a rule set.
pub fn threshold_config(data: &[u8]) {
    use palisade_inspect::rules::threshold_config::ThresholdConfig;
    let Ok(text) = std::str::from_utf8(data) else { return };
    if text.len() > 64 * 1024 {
        return;
    }
    let ctx = RuleContext::default();
    match ThresholdConfig::parse(text, &ctx.vars) {
        Ok(cfg) => {
            let mut set = RuleSet::parse(
                "alert udp any any -> any any (content:\"x\"; sid:1;)\n\
                 drop udp any any -> any any (content:\"x\"; threshold:type limit, track by_src, count 1, seconds 1; sid:2;)\n",
                &ctx,
                LoadOptions::default(),
            )
            .expect("fixed rules load");
            let unmatched = set.apply_threshold_config(&cfg);
            assert!(unmatched.len() <= cfg.entries.len());
            let lines = text.lines().count();
            assert!(cfg.entries.iter().all(|e| e.line >= 1 && e.line <= lines));
        }
        Err(e) => {
            let lines = text.lines().count().max(1);
            assert!(e.line >= 1 && e.line <= lines, "{e} (text has {lines} lines)");
            let width = text.lines().nth(e.line - 1).map_or(0, str::len);
            assert!(e.column >= 1 && e.column <= width + 1, "{e} (line is {width} bytes)");
            let _ = e.to_string();
        }
    }
}

pub struct Owned {
    transport: Transport,
    payload: Vec<u8>,
    src: [u8; 4],
    dst: [u8; 4],
}

impl Owned {
    pub fn packet(&self) -> Packet<'_> {
        Packet {
            src: self.src.into(),
            dst: self.dst.into(),
            protocol: if matches!(self.transport, Transport::Tcp(_)) {
                6
            } else {
                17
            },
            ttl: 64,
            transport: self.transport,
            payload: &self.payload,
            fragment: false,
            ip_len: 40 + self.payload.len(),
            checksum_ok: true,
        }
    }
}

fn udp(payload: &[u8]) -> Owned {
    Owned {
        transport: Transport::Udp {
            src_port: 5353,
            dst_port: 53,
        },
        payload: payload.to_vec(),
        src: [10, 0, 0, 1],
        dst: [10, 0, 0, 2],
    }
}

/// A little-endian reader over fuzz input.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from(self.byte()?) | u16::from(self.byte()?) << 8)
    }
}

/// Reassembly against a model: segments (offset, length, fill) land in a
/// stream with small limits; the stream's contiguous bytes always equal the
/// model's (first data wins; refused segments leave no trace), whatever the
/// order, overlaps, releases and limits.
pub fn stream(data: &[u8]) {
    use palisade_inspect::stream::Stream;
    let mut input = Input(data);
    let limits = StreamLimits {
        depth: 4096,
        max_ooo_bytes: 1024,
        max_ooo_segments: 8,
    };
    let mut budget = LocalBudget::new(MemoryBudget::new(1 << 20));
    let mut counters = Default::default();
    let base: u32 = u32::MAX - 600; // sequence numbers wrap inside the run
    let mut s = Stream::new(base);
    let mut model: Vec<Option<u8>> = vec![None; 4096 + 512];
    let mut released = 0u64;
    while let (Some(op), Some(off), Some(len)) = (input.byte(), input.u16(), input.byte()) {
        let off = u64::from(off % 4300);
        if op % 8 == 7 {
            // Consumers moved on: release what is before `off` (bounded by what exists).
            let keep = off.min(s.next());
            s.raw_progress = keep;
            s.app_progress = keep;
            s.release_before(keep, &mut budget);
            released = released.max(keep);
            continue;
        }
        let fill = op;
        let bytes: Vec<u8> = (0..u64::from(len)).map(|i| fill.wrapping_add(i as u8)).collect();
        let seq = base.wrapping_add(off as u32);
        let result = s.insert(seq, &bytes, &limits, &mut budget, &mut counters);
        use palisade_inspect::stream::Insert;
        match result {
            Insert::Refused | Insert::BeyondDepth => {}
            Insert::Advanced { .. } | Insert::Held | Insert::Duplicate => {
                for (i, &b) in bytes.iter().enumerate() {
                    let o = off as usize + i;
                    if (o as u64) < limits.depth && model[o].is_none() {
                        model[o] = Some(b);
                    }
                }
            }
        }
        let next = s.next();
        let expected_next = model.iter().position(Option::is_none).unwrap_or(model.len()) as u64;
        // Held segments beyond a hole do not count; contiguous data ends at the first hole.
        assert_eq!(next, expected_next.min(limits.depth), "contiguous end");
        let from = released.min(next);
        let (window, origin) = s.window(from, next, 0);
        assert_eq!(origin, 0);
        let want: Vec<u8> = model[from as usize..next as usize]
            .iter()
            .map(|b| b.expect("contiguous"))
            .collect();
        assert_eq!(window, &want[..], "bytes {from}..{next}");
        assert!(s.held() <= (next - from) as usize + limits.max_ooo_bytes + 4096);
    }
    s.release_all(&mut budget);
    assert_eq!(budget.in_use(), 0);
}

/// Splits `data` at up to 8 points taken from its first bytes.
fn chunks(data: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return (vec![], data);
    };
    let n = usize::from(n % 8);
    let (cuts, body) = rest.split_at(n.min(rest.len()));
    let mut points: Vec<usize> = cuts.iter().map(|&c| usize::from(c) % (body.len() + 1)).collect();
    points.sort_unstable();
    let mut out = Vec::new();
    let mut at = 0;
    for p in points {
        out.push(&body[at..p]);
        at = p;
    }
    out.push(&body[at..]);
    (out, body)
}

fn http_txs(p: &HttpParser) -> Vec<HttpTx> {
    p.txs()
        .iter()
        .cloned()
        .map(|mut t| {
            t.updated = false;
            t
        })
        .collect()
}

fn same_txs(a: &[HttpTx], b: &[HttpTx]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(
            (
                &x.method,
                &x.uri,
                &x.host,
                &x.user_agent,
                &x.status,
                &x.request_header_block,
                x.request,
                x.response
            ),
            (
                &y.method,
                &y.uri,
                &y.host,
                &y.user_agent,
                &y.status,
                &y.request_header_block,
                y.request,
                y.response
            )
        );
    }
}

/// The application-layer parsers: no panic, bounded state, and the same
/// result whether the bytes arrive at once or cut anywhere.
pub fn app(data: &[u8]) {
    let (parts, body) = chunks(data);
    // HTTP/1.x, as requests and as responses.
    let (mut whole, mut split) = (HttpParser::new(), HttpParser::new());
    whole.parse_request(body);
    whole.parse_response(body);
    for p in &parts {
        split.parse_request(p);
    }
    for p in &parts {
        split.parse_response(p);
    }
    assert!(whole.txs().len() <= MAX_TXS);
    same_txs(&http_txs(&whole), &http_txs(&split));
    // TLS.
    let (mut whole, mut split) = (TlsParser::new(), TlsParser::new());
    whole.parse_client(body);
    parts.iter().for_each(|p| split.parse_client(p));
    assert_eq!((&whole.sni, whole.client_hello), (&split.sni, split.client_hello));
    // DNS over TCP, and each part as a datagram.
    let (mut whole, mut split) = (DnsParser::new(), DnsParser::new());
    whole.parse_stream(true, body);
    parts.iter().for_each(|p| split.parse_stream(true, p));
    let names = |d: &DnsParser| d.txs().iter().map(|t| t.queries.clone()).collect::<Vec<_>>();
    assert_eq!(names(&whole), names(&split));
    let mut dgrams = DnsParser::new();
    parts.iter().for_each(|p| dgrams.parse_datagram(p));
    // HTTP/2 after a preface, and HPACK alone.
    let mut h2 = palisade_inspect::app::http2::PREFACE.to_vec();
    h2.extend_from_slice(body);
    let (mut whole, mut split) = (Http2Parser::new(), Http2Parser::new());
    whole.parse(true, &h2);
    whole.parse(false, body);
    split.parse(true, palisade_inspect::app::http2::PREFACE);
    parts.iter().for_each(|p| split.parse(true, p));
    parts.iter().for_each(|p| split.parse(false, p));
    let uris = |h: &Http2Parser| h.txs().map(|t| (t.uri.clone(), t.status.clone())).collect::<Vec<_>>();
    assert_eq!(uris(&whole), uris(&split));
    let mut d = Decoder::default();
    for p in &parts {
        let _ = d.decode(p);
    }
}

/// A TCP conversation made of the input through the whole engine (IDS and
/// IPS): no panic, and every stream byte is given back at the end.
pub fn engine(data: &[u8]) {
    // Compiled once: each input gets fresh inspectors sharing them.
    static COMPILED: std::sync::OnceLock<(Arc<RuleSet>, Arc<[palisade_inspect::Detector]>)> =
        std::sync::OnceLock::new();
    let (rules, detectors) = COMPILED.get_or_init(|| {
        let rules = Arc::new(
            RuleSet::parse(
                r#"alert tcp any any -> any any (content:"EVIL"; sid:1;)
alert http any any -> any any (http.uri; content:"/x"; sid:2;)
drop tcp any any -> any any (content:"DROP"; flowbits:set,d; sid:3;)
alert tcp any any -> any any (flowbits:isset,d; pcre:"/a+b/"; sid:4;)
alert dns any any -> any any (dns.query; content:"evil"; sid:5;)"#,
                &RuleContext::default(),
                LoadOptions::default(),
            )
            .unwrap(),
        );
        let detectors = Inspector::compile(&rules, vec![ProfileSpec::full()]).unwrap();
        (rules, detectors)
    });
    for mode in [Mode::Ids, Mode::Ips] {
        let config = Config {
            mode,
            midstream: true,
            stream: StreamLimits {
                depth: 2048,
                max_ooo_bytes: 512,
                max_ooo_segments: 4,
            },
            stream_memory: 4096,
            ..Config::default()
        };
        let budget = MemoryBudget::new(config.stream_memory);
        let mut insp = Inspector::shared(rules.clone(), detectors.clone(), config, budget);
        let mut input = Input(data);
        let mut flow: Option<FlowState> = None;
        let mut alerts = Vec::new();
        let mut t = 0u64;
        while let (Some(flags), Some(seq), Some(len)) = (input.byte(), input.u16(), input.byte()) {
            let from_client = flags & 0x80 == 0;
            let n = usize::from(len % 64).min(input.0.len());
            let (payload, rest) = input.0.split_at(n);
            input.0 = rest;
            let (src, dst, sp, dp) = if from_client {
                ([10, 0, 0, 1], [10, 0, 0, 2], 40000, 80)
            } else {
                ([10, 0, 0, 2], [10, 0, 0, 1], 80, 40000)
            };
            let p = Owned {
                transport: Transport::Tcp(TcpHeader {
                    src_port: sp,
                    dst_port: dp,
                    seq: u32::from(seq).wrapping_mul(7),
                    ack: u32::from(seq).wrapping_mul(11),
                    flags: flags & 0x3f,
                    window: 1000,
                    fast_open: flags & 0x40 != 0,
                }),
                payload: payload.to_vec(),
                src,
                dst,
            };
            let f = flow.get_or_insert_with(|| FlowState::new(palisade_inspect::ProfileId(0), &p.packet()));
            t += 1;
            let _ = insp.inspect(f, &p.packet(), Duration::from_secs(t), &mut alerts);
        }
        if let Some(mut f) = flow {
            let _ = insp.flush(&mut f, Duration::from_secs(t), &mut alerts);
            assert_eq!(f.stream_bytes(), 0);
        }
        assert_eq!(insp.stream_memory_in_use(), 0);
    }
}

const PERSIST_RULES: &str = r#"alert tcp any any -> any any (content:"EVIL"; sid:1;)
alert http any any -> any any (http.uri; content:"/x"; sid:2;)
drop tcp any any -> any any (content:"DROP"; flowbits:set,d; sid:3;)
alert tcp any any -> any any (flowbits:isset,d; pcre:"/a+b/"; sid:4;)
alert dns any any -> any any (dns.query; content:"evil"; sid:5;)
alert tcp any any -> any any (content:"LOGIN"; flowbits:set,in; flowbits:noalert; sid:6;)
alert tcp any any -> any any (content:"aab"; flowbits:isset,in; threshold:type limit, track by_flow, count 2, seconds 5; sid:7;)
alert http any any -> any any (http.header; content:"evil"; sid:8;)
alert tls any any -> any any (tls.sni; content:"evil"; sid:9;)
alert tcp any any -> any any (content:"ping"; detection_filter:track by_flow, count 2, seconds 3; sid:10;)"#;

/// `PERSIST_RULES` compiled twice: as written, and renumbered (another rule
/// first, the rest reversed), as another host may have them.
/// Rules and their compiled profiles.
type Compiled = (Arc<RuleSet>, Arc<[palisade_inspect::Detector]>);

fn persist_rules() -> &'static [Compiled; 2] {
    static COMPILED: std::sync::OnceLock<[Compiled; 2]> = std::sync::OnceLock::new();
    COMPILED.get_or_init(|| {
        let renumbered = format!(
            "alert tcp any any -> any any (content:\"|00 01 02 03 04 05 06 07|\"; flowbits:set,zz; sid:99;)\n{}",
            PERSIST_RULES.lines().rev().collect::<Vec<_>>().join("\n")
        );
        [PERSIST_RULES, renumbered.as_str()].map(|text| {
            let rules = Arc::new(RuleSet::parse(text, &RuleContext::default(), LoadOptions::default()).unwrap());
            let detectors = Inspector::compile(&rules, vec![ProfileSpec::full()]).unwrap();
            (rules, detectors)
        })
    })
}

fn persist_inspector(which: usize, mode: Mode) -> Inspector {
    let (rules, detectors) = &persist_rules()[which];
    let config = Config {
        mode,
        inline_stream: mode == Mode::Ips,
        midstream: true,
        stream: StreamLimits {
            depth: 2048,
            max_ooo_bytes: 512,
            max_ooo_segments: 4,
        },
        stream_memory: 4096,
        ..Config::default()
    };
    let budget = MemoryBudget::new(config.stream_memory);
    Inspector::shared(rules.clone(), detectors.clone(), config, budget)
}

/// A TCP (or, first byte odd, UDP) conversation from the input: in-order
/// data, tokens of the protocols the engine parses, out-of-order segments,
/// bare acknowledgments and FINs, each way.
fn conversation(input: &mut Input<'_>) -> Vec<Owned> {
    const TOKENS: &[&[u8]] = &[
        b"GET /x HTTP/1.1\r\n",
        b"Host: evil\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
        b"EVIL",
        b"DROP",
        b"aab",
        b"LOGIN",
        b"ping",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
        // HEADERS, stream 1: GET http /x, x-h: evil indexed into the table.
        b"\x00\x00\x0d\x01\x05\x00\x00\x00\x01\x82\x86\x04\x02/x\x40\x03x-h\x04evil",
        // HEADERS, stream 3: the table's entry by index.
        b"\x00\x00\x04\x01\x05\x00\x00\x00\x03\x82\x86\x84\xbe",
        b"\x16\x03\x01\x00\x30\x01\x00\x00\x2c\x03\x03",
        b"\x00\x1d\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x04evil\x03com\x00\x00\x01\x00\x01",
    ];
    let udp = input.byte().unwrap_or(0) & 1 == 1;
    let (mut next, mut seq) = ([1000u32, 9000u32], [1000u32, 9000u32]);
    let mut out = Vec::new();
    let mut push = |from_client: bool, flags: u8, seq: u32, ack: u32, payload: Vec<u8>| {
        let (src, dst, sp, dp) = if from_client {
            ([10, 0, 0, 1], [10, 0, 0, 2], 40000, 80)
        } else {
            ([10, 0, 0, 2], [10, 0, 0, 1], 80, 40000)
        };
        let transport = if udp {
            Transport::Udp {
                src_port: sp,
                dst_port: if from_client { 53 } else { dp },
            }
        } else {
            Transport::Tcp(TcpHeader {
                src_port: sp,
                dst_port: dp,
                seq,
                ack,
                flags,
                window: 1000,
                fast_open: false,
            })
        };
        out.push(Owned {
            transport,
            payload,
            src,
            dst,
        });
    };
    if !udp && input.byte().unwrap_or(0) & 1 == 0 {
        use palisade_inspect::packet::tcp_flags::{ACK, SYN};
        push(true, SYN, 999, 0, Vec::new());
        push(false, SYN | ACK, 8999, 1000, Vec::new());
        push(true, ACK, 1000, 9000, Vec::new());
    }
    for _ in 0..45 {
        let Some(b) = input.byte() else { break };
        let d = usize::from(b & 1);
        let from_client = d == 0;
        let payload = match (b >> 1) & 3 {
            0 => {
                let n = usize::from(input.byte().unwrap_or(0) % 48).min(input.0.len());
                let (p, rest) = input.0.split_at(n);
                input.0 = rest;
                p.to_vec()
            }
            1 | 2 => TOKENS[usize::from(input.byte().unwrap_or(0)) % TOKENS.len()].to_vec(),
            _ => Vec::new(),
        };
        let flags = palisade_inspect::packet::tcp_flags::ACK
            | if b & 0x40 != 0 && payload.is_empty() {
                palisade_inspect::packet::tcp_flags::FIN
            } else {
                0
            };
        // Kind 2: out of order, ahead of the next byte; otherwise in order.
        let at = if (b >> 1) & 3 == 2 {
            next[d].wrapping_add(u32::from(b >> 4) + 1)
        } else {
            next[d]
        };
        if at == next[d] {
            next[d] = next[d].wrapping_add(payload.len() as u32);
        }
        seq[d] = at;
        push(from_client, flags, seq[d], next[1 - d], payload);
    }
    out
}

/// Outcomes and (packet, sid) alerts of a run, the alerts of each packet sorted.
type Trace = (Vec<palisade_inspect::Outcome>, Vec<(usize, u32)>);

fn persist_step(insp: &mut Inspector, flow: &mut FlowState, p: &Owned, i: usize, trace: &mut Trace) {
    let mut alerts = Vec::new();
    trace
        .0
        .push(insp.inspect(flow, &p.packet(), Duration::from_secs(i as u64), &mut alerts));
    trace
        .1
        .extend(alerts.iter().map(|a| (i, insp.rules().get(a.sig).rule.sid)));
}

fn persist_finish(insp: &mut Inspector, flow: &mut FlowState, n: usize, trace: &mut Trace) {
    let mut alerts = Vec::new();
    let _ = insp.flush(flow, Duration::from_secs(n as u64), &mut alerts);
    trace
        .1
        .extend(alerts.iter().map(|a| (usize::MAX, insp.rules().get(a.sig).rule.sid)));
    trace.1.sort_unstable();
    assert_eq!(flow.stream_bytes(), 0);
}

/// A flow's carried state (`palisade_inspect::persist`). First byte even:
/// the rest is a conversation cut at a point the first byte gives; its
/// first part inspected by one inspector, its state exported and imported
/// into another with the rules numbered differently, the rest inspected
/// there, gives the outcomes and alerts of the uncut conversation, and
/// nothing is resumed mid-stream. First byte odd: the rest (after a valid
/// header when bit 1 is set) is a record: importing it never panics; an
/// accepted one exports to a record that imports and exports to the same
/// bytes, its flow inspects more packets, and every stream byte charged is
/// given back.
pub fn persist(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let mode = if first & 0x80 != 0 { Mode::Ips } else { Mode::Ids };
    if first & 1 == 1 {
        let mut record = Vec::new();
        if first & 2 != 0 {
            record.extend_from_slice(b"PLSI\x00\x01\x04full");
        }
        record.extend_from_slice(rest);
        let mut insp = persist_inspector(1, mode);
        let importer = insp.flow_importer();
        let now = Duration::from_secs(100);
        let Ok(imported) = insp.import_flow(&importer, &record, now) else {
            assert_eq!(insp.stream_memory_in_use(), 0);
            return;
        };
        let mut flow = imported.flow;
        let mut again = Vec::new();
        insp.export_flow(&flow, now, &mut again);
        let mut second = insp
            .import_flow(&importer, &again, now)
            .unwrap_or_else(|e| panic!("a record this build wrote is refused: {e}"))
            .flow;
        let mut third = Vec::new();
        insp.export_flow(&second, now, &mut third);
        assert_eq!(again, third, "export after import is stable");
        let mut input = Input(rest);
        let packets = conversation(&mut input);
        let mut trace = (Vec::new(), Vec::new());
        for (i, p) in packets.iter().enumerate() {
            persist_step(&mut insp, &mut flow, p, i, &mut trace);
        }
        persist_finish(&mut insp, &mut flow, packets.len(), &mut trace);
        persist_finish(&mut insp, &mut second, packets.len(), &mut trace);
        assert_eq!(insp.stream_memory_in_use(), 0);
        return;
    }
    let mut input = Input(rest);
    let packets = conversation(&mut input);
    if packets.is_empty() {
        return;
    }
    let cut = usize::from(first >> 1 & 0x3f) % (packets.len() + 1);
    let mut whole = persist_inspector(0, mode);
    let mut flow = FlowState::new(palisade_inspect::ProfileId(0), &packets[0].packet());
    let mut want = (Vec::new(), Vec::new());
    for (i, p) in packets.iter().enumerate() {
        persist_step(&mut whole, &mut flow, p, i, &mut want);
    }
    persist_finish(&mut whole, &mut flow, packets.len(), &mut want);
    let mut source = persist_inspector(0, mode);
    let mut flow = FlowState::new(palisade_inspect::ProfileId(0), &packets[0].packet());
    let mut got = (Vec::new(), Vec::new());
    for (i, p) in packets[..cut].iter().enumerate() {
        persist_step(&mut source, &mut flow, p, i, &mut got);
    }
    let at = Duration::from_secs(cut as u64);
    let mut record = Vec::new();
    source.export_flow(&flow, at, &mut record);
    let mut dest = persist_inspector(1, mode);
    let importer = dest.flow_importer();
    let imported = dest
        .import_flow(&importer, &record, at)
        .unwrap_or_else(|e| panic!("a record this build wrote is refused: {e}"));
    assert!(!imported.resumed_midstream && imported.unknown_refs == 0);
    let mut flow = imported.flow;
    for (i, p) in packets.iter().enumerate().skip(cut) {
        persist_step(&mut dest, &mut flow, p, i, &mut got);
    }
    persist_finish(&mut dest, &mut flow, packets.len(), &mut got);
    assert_eq!(got, want, "cut before packet {cut} of {}", packets.len());
    assert_eq!(dest.stream_memory_in_use(), 0);
}

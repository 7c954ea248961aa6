//! The metrics page: Prometheus text exposition format (every family with
//! one HELP and one TYPE line before its samples, valid names, escaped label
//! values, counters named `_total`), summed over the workers' engines.

mod support;

use std::collections::{BTreeMap, HashSet};

use palisade_agent::metrics::{Snapshot, render};
use palisade_agent::trail::TrailStats;
use palisade_datapath::{DropReason, Engine, Results};
use palisade_io::port::PortStats;

/// One sample: family name, labels, value.
type Sample = (String, BTreeMap<String, String>, u64);

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Parse `{k="v",…}`, undoing the format's escapes; panics on anything else.
fn labels(mut s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    while !s.is_empty() {
        let (key, rest) = s.split_once("=\"").expect("label: key=\"value\"");
        assert!(is_name(key), "label name {key:?}");
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next().expect("unterminated label value") {
                (i, '"') => break i,
                (_, '\\') => match chars.next().expect("escape at the end").1 {
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    'n' => value.push('\n'),
                    c => panic!("bad escape \\{c}"),
                },
                (_, '\n') => panic!("raw newline in a label value"),
                (_, c) => value.push(c),
            }
        };
        assert!(out.insert(key.to_string(), value).is_none(), "label {key} twice");
        s = &rest[end + 1..];
        s = s.strip_prefix(',').unwrap_or(s);
    }
    out
}

/// Check the exposition format and return its samples.
fn parse(text: &str) -> Vec<Sample> {
    let mut help = HashSet::new();
    let mut kinds: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Vec::new();
    assert!(text.ends_with('\n'));
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, doc) = rest.split_once(' ').expect("HELP name text");
            assert!(is_name(name) && !doc.is_empty(), "{line}");
            assert!(help.insert(name.to_string()), "HELP twice for {name}");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(help.contains(name), "TYPE before HELP for {name}");
            assert!(matches!(kind, "counter" | "gauge"), "{line}");
            assert!(
                kind != "counter" || name.ends_with("_total"),
                "counter {name} is not named _total"
            );
            assert!(
                kinds.insert(name.to_string(), kind.to_string()).is_none(),
                "TYPE twice for {name}"
            );
        } else {
            let (series, value) = line.rsplit_once(' ').expect("sample: series value");
            let (name, rest) = series.split_once('{').unwrap_or((series, "}"));
            let inner = rest.strip_suffix('}').expect("labels end with }");
            assert!(kinds.contains_key(name), "sample of {name} before its TYPE");
            let value: u64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
            samples.push((name.to_string(), labels(inner), value));
        }
    }
    samples
}

fn value(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> Option<u64> {
    let found: Vec<u64> = samples
        .iter()
        .filter(|(n, l, _)| n == name && with.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
        .map(|s| s.2)
        .collect();
    assert!(found.len() <= 1, "{name} {with:?}: {found:?}");
    found.first().copied()
}

const HOST: &str = "hv\"1\\\n";

fn snapshot<'a>(
    engines: &'a [&'a Engine],
    ports: &'a [(String, String, PortStats)],
    ids: &'a [palisade_datapath::PortId],
) -> Snapshot<'a> {
    Snapshot {
        host: HOST,
        engines,
        ports,
        port_ids: ids,
        overlay: PortStats {
            rx_frames: 11,
            ..PortStats::default()
        },
        unroutable: 2,
        render_errors: 0,
        policy_errors: 1,
        audit: None,
        ipfix: None,
        controller_dropped: None,
        snapshots: palisade_agent::snapshot::SnapshotStats {
            written: 5,
            last_connections: 48,
            ..Default::default()
        },
        state_refused: &REFUSED,
        journal: palisade_agent::journal::JournalStats {
            records: 9,
            overflows: 3,
            rotations: 2,
        },
    }
}

/// One state file refused for its checksum, two as another host's.
static REFUSED: std::sync::LazyLock<std::collections::BTreeMap<&'static str, u64>> =
    std::sync::LazyLock::new(|| [("checksum", 1), ("foreign", 2)].into());

#[test]
fn the_page_is_prometheus_text_summed_over_workers() {
    let c = support::compiler(4);
    let (mut w0, mut w1) = (support::engine(&c), support::engine(&c));
    let mut events = Vec::new();
    // Worker 0: an allowed connection and a denied telnet; worker 1: another allowed connection.
    let _ = w0.engine.process(
        1,
        w0.ports[0],
        &support::syn(0, 1, 40000, 5432),
        &mut events,
        &mut Results::new(),
    );
    let _ = w0.engine.process(
        2,
        w0.ports[0],
        &support::syn(0, 1, 40001, 23),
        &mut events,
        &mut Results::new(),
    );
    let _ = w1.engine.process(
        3,
        w1.ports[2],
        &support::syn(2, 3, 40002, 5432),
        &mut events,
        &mut Results::new(),
    );
    let engines = [&w0.engine, &w1.engine];
    let ports: Vec<(String, String, PortStats)> = (0..4)
        .map(|i| {
            let stats = PortStats {
                rx_frames: 10 * i as u64,
                ..PortStats::default()
            };
            (format!("vm-{i}.0"), format!("vn{i}"), stats)
        })
        .collect();
    let mut snap = snapshot(&engines, &ports, &w0.ports);
    snap.audit = Some(TrailStats {
        written: 5,
        pending: 2,
        last_seq: 5,
        signed_seq: 3,
        ..TrailStats::default()
    });
    snap.controller_dropped = Some(4);
    let samples = parse(&render(&snap));

    // Every sample names the host, escaped as the format says and read back as it was.
    assert!(samples.iter().all(|(_, l, _)| l["host"] == HOST));
    let v = |name, with: &[(&str, &str)]| value(&samples, name, with);
    assert_eq!(v("palisade_packets_total", &[]), Some(3));
    assert_eq!(v("palisade_worker_packets_total", &[("worker", "0")]), Some(2));
    assert_eq!(v("palisade_worker_packets_total", &[("worker", "1")]), Some(1));
    // Every drop reason has a row, zero or not.
    for r in DropReason::ALL {
        let want = u64::from(r == DropReason::PolicyDeny);
        assert_eq!(v("palisade_drops_total", &[("reason", r.name())]), Some(want), "{r:?}");
    }
    assert_eq!(
        v(
            "palisade_port_drops_total",
            &[("port", "vm-0.0"), ("reason", "policy-deny")]
        ),
        Some(1)
    );
    assert_eq!(
        v(
            "palisade_port_rx_frames_total",
            &[("port", "vm-2.0"), ("interface", "vn2")]
        ),
        Some(20)
    );
    assert_eq!(
        v(
            "palisade_port_rx_frames_total",
            &[("port", "underlay"), ("interface", "udp")]
        ),
        Some(11)
    );
    assert_eq!(v("palisade_state_snapshots_total", &[]), Some(5));
    assert_eq!(v("palisade_state_snapshot_connections", &[]), Some(48));
    assert_eq!(v("palisade_state_files_refused_total", &[]), Some(3));
    assert_eq!(v("palisade_state_refused_total", &[("reason", "checksum")]), Some(1));
    assert_eq!(v("palisade_state_refused_total", &[("reason", "foreign")]), Some(2));
    assert_eq!(v("palisade_state_journal_records_total", &[]), Some(9));
    assert_eq!(v("palisade_state_journal_overflows_total", &[]), Some(3));
    // A rule's counts are summed over the workers' registries.
    let hits: u64 = engines
        .iter()
        .flat_map(|e| e.rules())
        .filter(|r| r.rule.to_string() == "web-to-db")
        .map(|r| r.tally.hits)
        .sum();
    assert!(hits >= 2, "both workers classified a web-to-db flow");
    assert_eq!(
        v("palisade_rule_hits_total", &[("rule", "web-to-db"), ("level", "zone")]),
        Some(hits)
    );
    assert_eq!(v("palisade_policy_version", &[]), Some(support::VERSION));
    assert_eq!(v("palisade_policy_reload_errors_total", &[]), Some(1));
    assert_eq!(v("palisade_unroutable_outputs_total", &[]), Some(2));
    assert_eq!(v("palisade_audit_records_total", &[]), Some(5));
    assert_eq!(v("palisade_audit_pending_records", &[]), Some(2));
    assert_eq!(v("palisade_audit_unsigned_records", &[]), Some(2));
    assert_eq!(v("palisade_controller_flow_records_dropped_total", &[]), Some(4));
}

#[test]
fn optional_sections_appear_only_when_enabled() {
    let c = support::compiler(2);
    let w = support::engine(&c);
    let engines = [&w.engine];
    let text = render(&snapshot(&engines, &[], &[]));
    let samples = parse(&text);
    for prefix in ["palisade_audit_", "palisade_ipfix_", "palisade_controller_"] {
        assert!(!text.contains(prefix), "{prefix} without its source:\n{text}");
    }
    assert_eq!(value(&samples, "palisade_packets_total", &[]), Some(0));
    // With no ports, the underlay is still a row.
    assert_eq!(
        value(&samples, "palisade_port_rx_frames_total", &[("port", "underlay")]),
        Some(11)
    );
}

#[test]
fn the_take_over_of_a_fail_open_episode_is_two_counters() {
    use palisade_agent::metrics::fallback_takeover;
    use palisade_agent::takeover::TakeOverCounts;
    assert_eq!(fallback_takeover(HOST, None), "", "no episode ended: no family");
    let text = fallback_takeover(HOST, Some(TakeOverCounts { picked_up: 4, cut: 2 }));
    let samples = parse(&text);
    let v = |outcome| {
        value(
            &samples,
            "palisade_fallback_takeover_connections_total",
            &[("host", "hv\"1\\\n"), ("outcome", outcome)],
        )
    };
    assert_eq!((v("picked_up"), v("cut")), (Some(4), Some(2)));
}

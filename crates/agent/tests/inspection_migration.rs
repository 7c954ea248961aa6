//! A VM's inspection state moving with it (live migration): two hosts, each
//! an engine and a worker's [`Inline`] compiled apart from the same rules
//! and policy; the vNIC's connections move as the migration moves them
//! (`migrate::export`/`import`), its inspected flows as an inspection
//! section (`inspection::carry`). Inspection then goes on at the
//! destination where it stopped at the source: a signature cut by the
//! switchover matches, a flowbit set before gates a rule after, a dropped
//! flow stays dropped, a rule limited to one alert per flow does not alert
//! again. Each against a control: the same traffic at a destination that
//! did not get the section behaves otherwise, so the tests can fail.

mod migrating_host;
mod section_check;
mod support;

use std::time::Instant;

use migrating_host::{Conn, Fate, Host, MS, host, model};
use palisade_agent::inspection::InlineVerdict;
use palisade_agent::inspection::carry::{self, SectionError};
use palisade_agent::migrate;

/// Move vNIC a.0 from `src` to `dst`: its connections, and (`inspection`)
/// its inspection section. Returns the section's size.
fn migrate_a(src: &mut Host, dst: &mut Host, now: u64, inspection: bool) -> usize {
    let blob = migrate::export(&mut [&mut src.engine], "a.0", now).unwrap();
    migrate::import(&mut [&mut dst.engine], "a.0", &blob, now).unwrap();
    if !inspection {
        return 0;
    }
    let port = src.engine.port_of("a.0").unwrap();
    let mut flows = Vec::new();
    src.inline.export_vnic_flows(&src.engine, port, now, &mut flows);
    let section = carry::encode("a.0", &flows);
    let done = carry::import(&mut [Some(&mut dst.inline)], "a.0", &section, now).unwrap();
    assert_eq!(done.flows, flows.len());
    assert_eq!((done.midstream, done.unknown_profile, done.uninspected), (0, 0, 0));
    section.len()
}

/// Two hosts; a connection opened on the first and `before` sent there;
/// the vNIC migrated (with or without its inspection state); returns the
/// hosts, the connection and the time.
fn scenario(before: &[&[u8]], inspection: bool) -> (Host, Host, Conn, u64) {
    let m = model();
    let (mut src, mut dst) = (host(&m, "h1"), host(&m, "h2"));
    let mut now = MS;
    let mut c = Conn::open(&mut src, 40000, now);
    for data in before {
        now += MS;
        let fate = c.send(&mut src, data, now);
        assert!(matches!(fate, Fate::Inspected(_)), "{fate:?}");
    }
    now += MS;
    migrate_a(&mut src, &mut dst, now, inspection);
    (src, dst, c, now + MS)
}

#[test]
fn a_signature_split_across_the_switchover_still_drops_on_the_destination() {
    for inspection in [true, false] {
        let (mut src, mut dst, mut c, now) = scenario(&[b"GET /?q=evil-"], inspection);
        assert!(src.alerts().is_empty(), "the first half passes the source");
        assert_eq!(src.inline.counters().drops, 0);
        let second = c.send(&mut dst, b"7f3a HTTP/1.1\r\n\r\n", now);
        if inspection {
            assert_eq!(second, Fate::Inspected(InlineVerdict::Drop));
            assert_eq!(dst.alerts(), vec![1]);
            assert_eq!(dst.inline.counters().drops, 1);
        } else {
            assert_eq!(
                second,
                Fate::Inspected(InlineVerdict::Forward),
                "control: a destination picking the flow up mid-stream misses the marker"
            );
        }
    }
}

#[test]
fn a_flowbit_set_on_the_source_gates_a_rule_on_the_destination() {
    for inspection in [true, false] {
        let (mut src, mut dst, mut c, now) = scenario(&[b"LOGIN bob\r\n"], inspection);
        assert!(src.alerts().is_empty(), "the setter does not alert");
        assert_eq!(
            c.send(&mut dst, b"read SECRET\r\n", now),
            Fate::Inspected(InlineVerdict::Forward)
        );
        let want: Vec<u32> = if inspection { vec![3] } else { vec![] };
        assert_eq!(dst.alerts(), want, "inspection state carried: {inspection}");
    }
}

#[test]
fn a_flow_dropped_by_inspection_stays_dropped() {
    for inspection in [true, false] {
        // Dropped on the source just before the switchover: its connection
        // was cut there (it moves none), its verdict moves with the section.
        let (mut src, mut dst, mut c, now) = scenario(&[b"GET /?q=evil-7f3a\r\n"], inspection);
        assert_eq!(src.alerts(), vec![1]);
        assert_eq!(src.inline.counters().drops, 1);
        let later = c.send(&mut dst, b"harmless\r\n", now);
        eprintln!("after the drop, at the destination (section carried: {inspection}): {later:?}");
        if inspection {
            assert!(
                matches!(later, Fate::Dropped | Fate::Inspected(InlineVerdict::Drop)),
                "{later:?}"
            );
        } else {
            assert_ne!(later, Fate::Inspected(InlineVerdict::Drop));
        }
    }
}

#[test]
fn a_rule_limited_to_one_alert_per_flow_does_not_alert_again() {
    for inspection in [true, false] {
        let (mut src, mut dst, mut c, now) = scenario(&[b"ONCE\r\n"], inspection);
        assert_eq!(src.alerts(), vec![4]);
        let _ = c.send(&mut dst, b"ONCE again\r\n", now);
        let want: Vec<u32> = if inspection { vec![] } else { vec![4] };
        assert_eq!(dst.alerts(), want, "inspection state carried: {inspection}");
    }
}

#[test]
fn a_refused_section_changes_nothing_on_the_destination() {
    let (mut src, mut dst, _c, now) = scenario(&[b"LOGIN x\r\n"], false);
    let port = src.engine.port_of("a.0").unwrap();
    let mut flows = Vec::new();
    assert_eq!(src.inline.export_vnic_flows(&src.engine, port, now, &mut flows), 1);
    let good = carry::encode("a.0", &flows);
    let mut corrupt = good.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0x40;
    // (what, section, vNIC it is sent for, the refusal expected)
    type Case = (&'static str, Vec<u8>, &'static str, fn(&SectionError) -> bool);
    let cases: Vec<Case> = vec![
        ("corrupt", corrupt, "a.0", |e| {
            matches!(e, SectionError::Checksum { .. })
        }),
        ("cut", good[..good.len() - 1].to_vec(), "a.0", |e| {
            matches!(e, SectionError::Checksum { .. } | SectionError::Truncated { .. })
        }),
        ("other vNIC", good.clone(), "b.0", |e| {
            matches!(e, SectionError::ForeignVnic { .. })
        }),
        ("not a section", b"PLSDCT\x00\x02 nonsense".to_vec(), "a.0", |e| {
            *e == SectionError::BadMagic
        }),
        (
            "later version",
            {
                let mut v = good.clone();
                v[7] = 9;
                v
            },
            "a.0",
            |e| *e == SectionError::UnknownVersion(9),
        ),
    ];
    for (what, blob, vnic, ok) in cases {
        let e = carry::import(&mut [Some(&mut dst.inline)], vnic, &blob, now).unwrap_err();
        assert!(ok(&e), "{what}: {e}");
        assert_eq!(dst.inline.flows(), 0, "{what}: nothing imported");
    }
    // A record refused inside a valid section (checksum recomputed): named by its index.
    // The record ends before the removed count (u32) and the checksum (u32).
    let record_at = good.len() - 8 - flows[0].record_len();
    let mut bad = good[..good.len() - 4].to_vec();
    bad[record_at + 4] = 0xff;
    bad[record_at + 5] = 0xff;
    let crc = palisade_datapath::state::crc32(&bad);
    bad.extend_from_slice(&crc.to_be_bytes());
    let e = carry::import(&mut [Some(&mut dst.inline)], "a.0", &bad, now).unwrap_err();
    assert!(matches!(e, SectionError::Record { index: 0, .. }), "{e}");
    assert!(e.to_string().contains("version"), "{e}");
    assert_eq!(dst.inline.flows(), 0);
    // Flows steered to a worker without inspection are counted, not refused.
    let done = carry::import(&mut [None, None], "a.0", &good, now).unwrap();
    assert_eq!((done.flows, done.uninspected), (0, 1));
}

/// The pause's cost for 1,000 inspected flows, each mid-way through an
/// HTTP request: section bytes, export (with encoding) and import (with
/// decoding) times. Printed, not asserted (figures go in the report).
#[test]
fn pause_cost_of_a_thousand_inspected_flows() {
    let m = model();
    let (mut src, mut dst) = (host(&m, "h1"), host(&m, "h2"));
    let mut now = MS;
    for i in 0..1000u16 {
        let mut c = Conn::open(&mut src, 20000 + i, now);
        let _ = c.send(
            &mut src,
            b"GET /index.html HTTP/1.1\r\nHost: b\r\nUser-Agent: t\r\n\r\nLOGIN ",
            now,
        );
        now += MS / 100;
    }
    assert_eq!(src.inline.flows(), 1000);
    let port = src.engine.port_of("a.0").unwrap();
    // Wall time and this thread's CPU time (on a shared machine the two differ).
    let cpu = || {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `ts` is a valid timespec for the call to fill.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
    };
    let (t, c) = (Instant::now(), cpu());
    let mut flows = Vec::new();
    src.inline.export_vnic_flows(&src.engine, port, now, &mut flows);
    let section = carry::encode("a.0", &flows);
    let export = (t.elapsed(), cpu() - c);
    let (t, c) = (Instant::now(), cpu());
    let done = carry::import(&mut [Some(&mut dst.inline)], "a.0", &section, now).unwrap();
    let import = (t.elapsed(), cpu() - c);
    assert_eq!(done.flows, 1000);
    eprintln!(
        "1000 inspected flows: section {} bytes ({} per flow), export+encode {} us (CPU {} us), decode+import {} us (CPU {} us)",
        section.len(),
        section.len() / 1000,
        export.0.as_micros(),
        export.1,
        import.0.as_micros(),
        import.1
    );
}

/// Flows forgotten (idle expiry, a migrated-away vNIC's release) give
/// their held stream bytes back to the worker's budget: without that, a
/// worker's budget drains flow by flow and new stream data is refused.
#[test]
fn forgotten_flows_give_their_stream_memory_back() {
    let m = model();
    let mut h = host(&m, "h1");
    let mut now = MS;
    for cport in [41000, 41001] {
        let mut c = Conn::open(&mut h, cport, now);
        // Out of order: held until the hole before it is filled.
        c.seq += 100;
        let _ = c.send(&mut h, b"held until the hole is filled", now);
        now += MS;
    }
    assert!(h.inline.stream_memory_in_use() > 0);
    let port = h.engine.port_of("a.0").unwrap();
    assert_eq!(h.inline.forget_vnic_flows(&h.engine, port), 2);
    assert_eq!(h.inline.stream_memory_in_use(), 0);
    let mut c = Conn::open(&mut h, 41002, now);
    c.seq += 100;
    let _ = c.send(&mut h, b"held until the hole is filled", now);
    assert!(h.inline.stream_memory_in_use() > 0);
    h.inline.expire(now + 3600 * 1_000_000_000);
    assert_eq!(h.inline.flows(), 0);
    assert_eq!(h.inline.stream_memory_in_use(), 0, "expiry gives the bytes back");
}

/// One step of a conversation on vNIC a.0's host.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Open connection `n` (client port 30000 + n).
    Open(usize),
    /// Connection `n`'s client sends the bytes.
    Send(usize, &'static [u8]),
    /// Idle flows are forgotten (only connection 0 is idle by then).
    Expire,
}

/// Connections 1 to 3 talk while connection 0, idle ten minutes by then,
/// is forgotten midway: a marker split across segments (drop), a flowbit
/// set then tested, a rule limited to one alert per flow.
const STEPS: &[Step] = &[
    Step::Open(0),
    Step::Send(0, b"LOGIN x\r\n"),
    Step::Open(1),
    Step::Send(1, b"GET /?q=evil-"),
    Step::Open(2),
    Step::Send(2, b"LOGIN bob\r\n"),
    Step::Expire,
    Step::Send(1, b"7f3a HTTP/1.1\r\n\r\n"),
    Step::Send(2, b"read SECRET\r\n"),
    Step::Open(3),
    Step::Send(3, b"ONCE\r\n"),
    Step::Send(3, b"ONCE again\r\n"),
    Step::Send(2, b"more\r\n"),
];

/// Step `i`'s time: the first two at the start, the others ten minutes on.
fn step_time(i: usize) -> u64 {
    if i < 2 {
        (i as u64 + 1) * MS
    } else {
        601_000 * MS + i as u64 * MS
    }
}

/// What a step did: the frames' fates and the alerts raised.
type Trace = Vec<(usize, Vec<Fate>, Vec<u32>)>;

fn run(h: &mut Host, conns: &mut [Option<Conn>], from: usize, to: usize, trace: &mut Trace) {
    for (i, step) in STEPS.iter().enumerate().take(to).skip(from) {
        let now = step_time(i);
        let fates = match *step {
            Step::Open(n) => {
                conns[n] = Some(Conn::open(h, 30000 + n as u16, now));
                Vec::new()
            }
            Step::Send(n, data) => vec![conns[n].as_mut().unwrap().send(h, data, now)],
            Step::Expire => {
                h.inline.expire(now);
                Vec::new()
            }
        };
        let mut alerts = h.alerts();
        alerts.sort_unstable();
        trace.push((i, fates, alerts));
    }
}

/// The flows of a.0 on `h` as (record, idle) pairs, sorted: what a whole export carries.
fn whole_state(h: &mut Host, now: u64) -> Vec<(Vec<u8>, u64)> {
    let port = h.engine.port_of("a.0").unwrap();
    let mut flows = Vec::new();
    h.inline.export_vnic_flows(&h.engine, port, now, &mut flows);
    let mut v: Vec<_> = flows.iter().map(|f| (f.record().to_vec(), f.idle_ns())).collect();
    v.sort();
    v
}

/// The conversation cut twice, at every pair of steps: a pre-copy of the
/// inspected flows before step `p` (held on the destination), the delta
/// before step `d` (applied over it), the connections moved and the held
/// flows committed then, and the steps from `d` on run on the destination.
/// At every cut the destination holds exactly what a whole export at `d`
/// carries (byte for byte), and the conversation's fates and alerts are
/// the uncut conversation's; a delta with nothing changed since its
/// pre-copy carries no flow.
#[test]
fn a_delta_over_a_precopy_equals_a_whole_export_at_every_cut() {
    let m = model();
    let mut uncut = Trace::new();
    let mut h = host(&m, "h1");
    run(&mut h, &mut [None, None, None, None], 0, STEPS.len(), &mut uncut);
    let sids: Vec<u32> = uncut.iter().flat_map(|(_, _, a)| a.clone()).collect();
    assert_eq!(sids, vec![1, 3, 4], "the conversation raises what it is built to");
    let n = STEPS.len();
    for p in 0..=n {
        for d in p..=n {
            let (mut src, mut dst) = (host(&m, "h1"), host(&m, "h2"));
            let mut conns = [None, None, None, None];
            let mut trace = Trace::new();
            run(&mut src, &mut conns, 0, p, &mut trace);
            let port = src.engine.port_of("a.0").unwrap();
            let t = step_time(p.min(n - 1)) - MS / 2;
            let mut flows = Vec::new();
            let mark = src.inline.precopy_vnic_flows(&src.engine, port, t, &mut flows);
            let pre = carry::encode_section("a.0", carry::SectionKind::Precopy, &flows, &[]);
            let staged = carry::stage(&mut [Some(&mut dst.inline)], "a.0", &pre, t).unwrap();
            assert_eq!(staged.flows, flows.len(), "cut {p}/{d}");
            assert_eq!(dst.inline.flows(), 0, "cut {p}/{d}: a pre-copy is held, not live");
            run(&mut src, &mut conns, p, d, &mut trace);
            let t = step_time(d.min(n - 1)) - MS / 2;
            let (mut changed, mut gone) = (Vec::new(), Vec::new());
            src.inline
                .delta_vnic_flows(&src.engine, port, t, &mark, &mut changed, &mut gone)
                .expect("the pre-copy's inspector");
            if p == d {
                assert!(changed.is_empty() && gone.is_empty(), "cut {p}/{d}: nothing changed");
            }
            let delta = carry::encode_section("a.0", carry::SectionKind::Delta, &changed, &gone);
            carry::stage(&mut [Some(&mut dst.inline)], "a.0", &delta, t).unwrap();
            let blob = migrate::export(&mut [&mut src.engine], "a.0", t).unwrap();
            migrate::import(&mut [&mut dst.engine], "a.0", &blob, t).unwrap();
            let want = whole_state(&mut src, t);
            carry::commit_staged(&mut [Some(&mut dst.inline)], "a.0", t);
            assert_eq!(dst.inline.staged_flows("a.0"), None, "cut {p}/{d}");
            assert_eq!(
                whole_state(&mut dst, t),
                want,
                "cut {p}/{d}: delta over pre-copy = whole export"
            );
            run(&mut dst, &mut conns, d, n, &mut trace);
            assert_eq!(trace, uncut, "cut {p}/{d}");
        }
    }
}

/// A source host with two connections' inspected flows (0: `LOGIN`, 1:
/// idle), their pre-copy, then connection 0 talking on and connection 1
/// forgotten: returns the source, the pre-copy section, the delta's
/// changed flows and gone flows, and the time.
fn precopy_then_changes() -> (Host, Vec<u8>, Vec<carry::CarriedFlow>, Vec<carry::GoneFlow>, u64) {
    let m = model();
    let mut src = host(&m, "h1");
    let mut idle = Conn::open(&mut src, 31001, MS);
    let _ = idle.send(&mut src, b"hello\r\n", MS);
    let now = 601_000 * MS;
    let mut c = Conn::open(&mut src, 31000, now);
    let _ = c.send(&mut src, b"LOGIN x\r\n", now);
    let port = src.engine.port_of("a.0").unwrap();
    let mut flows = Vec::new();
    let mark = src.inline.precopy_vnic_flows(&src.engine, port, now, &mut flows);
    assert_eq!(flows.len(), 2);
    let pre = carry::encode_section("a.0", carry::SectionKind::Precopy, &flows, &[]);
    let now = now + MS;
    let _ = c.send(&mut src, b"read SECRET\r\n", now);
    src.inline.expire(now);
    let (mut changed, mut gone) = (Vec::new(), Vec::new());
    src.inline
        .delta_vnic_flows(&src.engine, port, now, &mark, &mut changed, &mut gone)
        .unwrap();
    assert_eq!((changed.len(), gone.len()), (1, 1));
    (src, pre, changed, gone, now)
}

/// A delta from the network is hostile input: one for a vNIC with no
/// pre-copy held, removing a flow the pre-copy did not hold, naming a flow
/// twice, cut anywhere, or removing flows in a section that is not a
/// delta, is refused with its reason, and what the destination holds and
/// tracks is unchanged (each refusal counted); the good delta then applies.
#[test]
fn hostile_deltas_are_refused_and_change_nothing() {
    let (_src, pre, changed, gone, now) = precopy_then_changes();
    let m = model();
    let mut dst = host(&m, "h2");
    let delta = carry::encode_section("a.0", carry::SectionKind::Delta, &changed, &gone);
    let mut refusals = 0;
    let mut refuse = |dst: &mut Host, blob: &[u8], held: Option<usize>| -> SectionError {
        let e = carry::stage(&mut [Some(&mut dst.inline)], "a.0", blob, now).unwrap_err();
        refusals += 1;
        assert_eq!(dst.inline.staged_flows("a.0"), held, "{e}: what is held is unchanged");
        assert_eq!(dst.inline.flows(), 0, "{e}: nothing live");
        assert_eq!(
            dst.inline.counters().migration_sections_refused,
            refusals,
            "{e}: counted"
        );
        e
    };
    // Before any pre-copy.
    let e = refuse(&mut dst, &delta, None);
    assert_eq!(e, SectionError::NoStagedCopy("a.0".into()), "{e}");
    // Over a pre-copy that did not hold the flow it removes: one held from an empty copy.
    let empty = carry::encode_section("a.0", carry::SectionKind::Precopy, &[], &[]);
    carry::stage(&mut [Some(&mut dst.inline)], "a.0", &empty, now).unwrap();
    let e = refuse(&mut dst, &delta, Some(0));
    assert_eq!(e, SectionError::UnknownFlow { index: 0 }, "{e}");
    carry::stage(&mut [Some(&mut dst.inline)], "a.0", &pre, now).unwrap();
    assert_eq!(dst.inline.staged_flows("a.0"), Some(2));
    // A flow twice; a flow both carried and removed.
    let twice = carry::encode_section(
        "a.0",
        carry::SectionKind::Delta,
        &[changed[0].clone(), changed[0].clone()],
        &[],
    );
    assert!(matches!(
        refuse(&mut dst, &twice, Some(2)),
        SectionError::Duplicate { .. }
    ));
    let both = carry::encode_section("a.0", carry::SectionKind::Delta, &changed, &[gone[0], gone[0]]);
    assert!(matches!(
        refuse(&mut dst, &both, Some(2)),
        SectionError::Duplicate { .. }
    ));
    // Cut at every length.
    for len in 0..delta.len() {
        let e = refuse(&mut dst, &delta[..len], Some(2));
        assert!(
            matches!(
                e,
                SectionError::Truncated { .. } | SectionError::Checksum { .. } | SectionError::BadMagic
            ),
            "cut at {len}: {e}"
        );
    }
    // Removals in a section that is not a delta (its kind byte rewritten, checksum recomputed).
    let mut not_delta = delta[..delta.len() - 4].to_vec();
    not_delta[8] = 1; // pre-copy
    let crc = palisade_datapath::state::crc32(&not_delta);
    not_delta.extend_from_slice(&crc.to_be_bytes());
    let e = refuse(&mut dst, &not_delta, Some(2));
    assert!(
        matches!(e, SectionError::Invalid { .. }) && e.to_string().contains("removed"),
        "{e}"
    );
    // A delta is not a whole section: the control socket's import refuses it.
    let e = carry::import(&mut [Some(&mut dst.inline)], "a.0", &delta, now).unwrap_err();
    refusals += 1;
    assert!(matches!(e, SectionError::WrongKind { .. }), "{e}");
    assert_eq!(dst.inline.counters().migration_sections_refused, refusals);
    // The good delta: the changed flow replaces its copy, the gone one goes.
    carry::stage(&mut [Some(&mut dst.inline)], "a.0", &delta, now).unwrap();
    assert_eq!(dst.inline.staged_flows("a.0"), Some(1));
    assert_eq!(carry::commit_staged(&mut [Some(&mut dst.inline)], "a.0", now), 1);
    assert_eq!(dst.inline.flows(), 1);
}

/// The value of the series `name` for host `host` in Prometheus text.
fn series(text: &str, name: &str, host: &str) -> Option<u64> {
    let prefix = format!("{name}{{host=\"{host}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
}

/// `/metrics`' inspection state and migration series follow the workers'
/// inline inspection: the flows tracked and the bytes they hold, the flows
/// carried out and in, those held for a commit, the sections refused.
#[test]
fn inspection_state_and_migration_counts_are_in_the_metrics() {
    use palisade_agent::metrics::{InlineGauges, inspection_state};
    let render = |h: &Host, name: &str| {
        let mut g = InlineGauges::default();
        g.add(&h.inline);
        inspection_state(name, &g, &h.inline.counters())
    };
    let (mut src, pre, changed, gone, now) = precopy_then_changes();
    // An out-of-order segment the source holds for reassembly.
    let mut held = Conn::open(&mut src, 31002, now);
    held.seq += 100;
    let _ = held.send(&mut src, b"held until the hole is filled", now);
    let text = render(&src, "h1");
    assert_eq!(series(&text, "palisade_inspect_flows", "h1"), Some(2), "{text}");
    assert_eq!(
        series(&text, "palisade_inspect_held_bytes", "h1"),
        Some(src.inline.stream_memory_in_use() as u64)
    );
    assert!(src.inline.stream_memory_in_use() > 0);
    assert_eq!(
        series(&text, "palisade_inspect_migration_flows_out_total", "h1"),
        Some(3),
        "two pre-copied, one in the delta: {text}"
    );
    let m = model();
    let mut dst = host(&m, "h2");
    let delta = carry::encode_section("a.0", carry::SectionKind::Delta, &changed, &gone);
    assert!(carry::stage(&mut [Some(&mut dst.inline)], "a.0", &delta, now).is_err());
    carry::stage(&mut [Some(&mut dst.inline)], "a.0", &pre, now).unwrap();
    let text = render(&dst, "h2");
    assert_eq!(series(&text, "palisade_inspect_migration_staged_flows", "h2"), Some(2));
    assert_eq!(series(&text, "palisade_inspect_flows", "h2"), Some(0));
    assert_eq!(
        series(&text, "palisade_inspect_migration_sections_refused_total", "h2"),
        Some(1)
    );
    carry::stage(&mut [Some(&mut dst.inline)], "a.0", &delta, now).unwrap();
    carry::commit_staged(&mut [Some(&mut dst.inline)], "a.0", now);
    let text = render(&dst, "h2");
    assert_eq!(series(&text, "palisade_inspect_migration_staged_flows", "h2"), Some(0));
    assert_eq!(series(&text, "palisade_inspect_flows", "h2"), Some(1));
    assert_eq!(
        series(&text, "palisade_inspect_migration_flows_in_total", "h2"),
        Some(1)
    );
    for name in ["flows", "held_bytes", "migration_staged_flows"] {
        assert!(
            text.contains(&format!("# TYPE palisade_inspect_{name} gauge\n")),
            "{name}"
        );
    }
}

/// The agent's Unix socket serves the inspection section both ways
/// (`export-inspection` on the source after its export,
/// `import-inspection` on the destination before its import) and refuses
/// what it cannot take with the reason: an unknown vNIC, a section over the
/// bound, a request without a body's length. An agent with no ports needs
/// no privileges.
#[test]
fn the_agent_socket_serves_inspection_sections_and_refuses_bad_ones() {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use palisade_agent::{Agent, http};
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("policy")).unwrap();
    std::fs::write(tmp.path().join("policy/policy.yaml"), support::policy(2)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let agent = Agent::start(support::agent_config(tmp.path()), stop.clone()).unwrap();
    let sock = tmp.path().join("state/agent.sock");
    let (_src, pre, _, _, _) = precopy_then_changes();
    for (path, body) in [
        ("/vnics/vm-0.0/export-inspection", &b""[..]),
        ("/vnics/vm-0.0/import-inspection", &pre[..]),
    ] {
        let e = http::post_unix(&sock, path, body).unwrap_err().to_string();
        assert!(
            e.contains("404 Not Found") && e.contains("no vNIC \"vm-0.0\" on this host"),
            "{path}: {e}"
        );
    }
    let e = http::post_unix(&sock, "/vnics/vm-0.0/inspect", b"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("404") && e.contains("import-inspection"), "{e}");
    let raw = |request: String| {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        let _ = s.write_all(request.as_bytes());
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.lines().next().unwrap_or("").to_string()
    };
    let big = palisade_agent::peer::MAX_FRAME + 1;
    let line = raw(format!(
        "POST /vnics/vm-0.0/import-inspection HTTP/1.1\r\nContent-Length: {big}\r\n\r\n"
    ));
    assert!(line.contains("413"), "{line}");
    let line = raw("POST /vnics/vm-0.0/import-inspection HTTP/1.1\r\n\r\n".into());
    assert!(line.contains("411"), "{line}");
    drop(agent);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// The section decoder's property (the fuzz target's,
/// `section_check`) over real sections of every kind and every one-byte
/// change to them, the checksum made right so the decoder behind it is
/// reached: no panic, and what it accepts encodes back to the same bytes.
#[test]
fn sections_and_every_one_byte_change_keep_the_decoders_property() {
    let (_src, pre, changed, gone, _) = precopy_then_changes();
    let delta = carry::encode_section("a.0", carry::SectionKind::Delta, &changed, &gone);
    let whole = carry::encode("a.0", &changed);
    for good in [&pre, &delta, &whole] {
        section_check::check_section(good).unwrap();
        assert!(carry::decode(good, "a.0").is_ok());
        for at in 0..good.len() - 4 {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut b = good.clone();
                b[at] ^= flip;
                let body = b.len() - 4;
                let crc = palisade_datapath::state::crc32(&b[..body]);
                b[body..].copy_from_slice(&crc.to_be_bytes());
                if let Err(e) = section_check::check_section(&b) {
                    panic!("byte {at} ^ {flip:#04x}: {e}");
                }
            }
        }
    }
}

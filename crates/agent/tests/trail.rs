//! The agent's audit trail: records appended in batches, each batch durable
//! (read back after the writer is gone), checkpoints signed and published
//! outside the trail, and a store that cannot be opened stopping the agent.

use std::path::Path;
use std::time::Duration;

use palisade_agent::AgentError;
use palisade_agent::trail::Trail;
use palisade_audit::record::{Endpoint, FlowRecord, Phase, Record, Verdict};
use palisade_audit::{LogReader, Query, Retention, SignedHead, VerifyOptions, verify_with};

const T0: u64 = 1_700_000_000_000_000_000;

fn record(n: u64) -> Record {
    let end = |last: u8, port| Endpoint {
        addr: std::net::Ipv4Addr::new(10, 0, 0, last).into(),
        port,
        vm: None,
    };
    Record::Flow(FlowRecord {
        appliance: None,
        time_ns: T0 + n,
        flow_id: n,
        host: "hv1".into(),
        phase: Phase::Start,
        src: end(10, 40000 + (n % 1000) as u16),
        dst: end(11, 5432),
        protocol: 6,
        icmp: None,
        verdict: Verdict::Allow,
        decided_by: Vec::new(),
        packets_out: 1,
        bytes_out: 74,
        packets_in: 0,
        bytes_in: 0,
        start_ns: T0 + n,
        last_ns: T0 + n,
    })
}

fn open(dir: &Path) -> Trail {
    Trail::open(
        &dir.join("audit"),
        Retention::default(),
        &dir.join("audit.key"),
        &dir.join("audit.head"),
    )
    .unwrap()
}

/// What the store holds, read by a reader of its own.
fn stored(dir: &Path) -> Vec<Record> {
    let reader = LogReader::open(&dir.join("audit")).unwrap();
    reader
        .query(&Query::default())
        .unwrap()
        .into_iter()
        .map(|(_, r)| r)
        .collect()
}

#[test]
fn records_are_appended_in_batches_of_at_most_a_thousand() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = open(tmp.path());
    for n in 1..=2500 {
        t.push(record(n));
        t.maybe_flush().unwrap();
    }
    let s = t.stats();
    // Every full thousand went out as it filled; a slow machine may also
    // have sent a smaller batch when one waited 200 ms, never a larger one.
    assert_eq!(s.written + s.pending, 2500, "{s:?}");
    assert!(s.written >= 2000 && s.batches >= 2, "{s:?}");
    assert!(s.batches * 1000 >= s.written, "{s:?}");
    assert_eq!(s.last_seq, s.written);
    // What was appended is durable: another reader sees it, in order.
    let seen = stored(tmp.path());
    assert_eq!(seen.len() as u64, s.written);
    assert_eq!(seen, (1..=s.written).map(record).collect::<Vec<_>>());
}

#[test]
fn a_waiting_record_goes_out_after_200_ms() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = open(tmp.path());
    t.maybe_flush().unwrap();
    assert_eq!(t.stats().batches, 0, "nothing queued, nothing appended");
    t.push(record(1));
    std::thread::sleep(Duration::from_millis(210));
    t.maybe_flush().unwrap();
    let s = t.stats();
    assert_eq!((s.written, s.pending, s.batches, s.last_seq), (1, 0, 1, 1));
    assert_eq!(stored(tmp.path()), [record(1)]);
}

#[test]
fn closing_appends_the_rest_and_signs_it_and_a_reopened_trail_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = open(tmp.path());
    for n in 1..=10 {
        t.push(record(n));
    }
    assert_eq!(t.stats().pending, 10);
    t.close(T0 + 1_000).unwrap();
    let s = t.stats();
    assert_eq!((s.written, s.pending, s.last_seq, s.signed_seq), (10, 0, 10, 10));
    assert_eq!(s.published_seq, Some(10));
    drop(t);

    // The head published outside the trail vouches for all of it.
    let head = SignedHead::read(&tmp.path().join("audit.head")).unwrap().unwrap();
    assert_eq!(head.seq, 10);
    let opts = VerifyOptions {
        key: None,
        expect_head: Some((head, "audit.head".into())),
    };
    let report = verify_with(&tmp.path().join("audit"), &opts).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!((report.records, report.signed_through), (10, 10));

    // The next run continues the sequence.
    let mut t = open(tmp.path());
    assert_eq!(t.stats().last_seq, 10);
    t.push(record(11));
    t.flush().unwrap();
    assert_eq!(t.stats().last_seq, 11);
    assert_eq!(stored(tmp.path()), (1..=11).map(record).collect::<Vec<_>>());
}

#[test]
fn a_store_that_cannot_be_opened_is_an_audit_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let not_a_dir = tmp.path().join("audit");
    std::fs::write(&not_a_dir, b"a file").unwrap();
    let e = Trail::open(
        &not_a_dir,
        Retention::default(),
        &tmp.path().join("audit.key"),
        &tmp.path().join("audit.head"),
    )
    .unwrap_err();
    assert!(matches!(&e, AgentError::Audit { dir, .. } if *dir == not_a_dir), "{e}");
    assert!(
        e.to_string()
            .starts_with(&format!("audit trail {}", not_a_dir.display())),
        "{e}"
    );
}

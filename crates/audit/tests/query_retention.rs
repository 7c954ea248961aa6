//! Queries agree with a brute-force scan; retention by age and by size keeps
//! the log verifiable.

mod common;

use std::time::Duration;

use common::*;
use palisade_audit::record::{Record, Verdict};
use palisade_audit::{AuditConfig, AuditLog, LogReader, ProblemKind, Query, RecordKind, Retention, verify};

fn cfg(retention: Retention) -> AuditConfig {
    AuditConfig {
        segment_bytes: 16 << 10,
        checkpoint_every: 50,
        retention,
        ..AuditConfig::default()
    }
}

#[test]
fn queries_match_a_brute_force_scan() {
    let tmp = TrailDir::new();
    let mut log = AuditLog::open(tmp.path(), cfg(Retention::default())).unwrap();
    let all = recs(0, 700);
    for chunk in all.chunks(64) {
        log.append(chunk).unwrap();
    }
    let queries = vec![
        Query::default(),
        Query {
            vm: Some("vm-3".into()),
            ..Query::default()
        },
        Query {
            vm: Some("vm-3".into()),
            since_ns: Some(T0 + 100 * SEC),
            until_ns: Some(T0 + 400 * SEC),
            ..Query::default()
        },
        Query {
            zone: Some("db".into()),
            verdict: Some(Verdict::Deny),
            ..Query::default()
        },
        Query {
            rule: Some("rule-2".into()),
            limit: Some(7),
            ..Query::default()
        },
        Query {
            kind: Some(RecordKind::Change),
            vm: Some("vm-1".into()),
            ..Query::default()
        },
        Query {
            vm: Some("nobody".into()),
            ..Query::default()
        },
        Query {
            since_ns: Some(T0 + 650 * SEC),
            ..Query::default()
        },
        Query {
            limit: Some(0),
            ..Query::default()
        },
    ];
    let reader = LogReader::open(tmp.path()).unwrap();
    assert_eq!(reader.records(), 700);
    for q in &queries {
        let mut want: Vec<(u64, Record)> = all
            .iter()
            .enumerate()
            .filter(|(_, r)| q.matches(r))
            .map(|(i, r)| (i as u64 + 1, r.clone()))
            .collect();
        if let Some(l) = q.limit {
            want.truncate(l);
        }
        let got = log.query(q).unwrap();
        assert_eq!(got.len(), want.len(), "{q:?}");
        assert!(got == want, "{q:?}");
        assert!(reader.query(q).unwrap() == want, "reader: {q:?}");
    }
    // Sanity of the oracle itself: the filters select something and not everything.
    let vm3 = all.iter().filter(|r| queries[1].matches(r)).count();
    assert!(vm3 > 50 && vm3 < 700, "{vm3}");
}

/// Alert records (and records of alerts shed) are indexed by kind, VM,
/// zone and rule, and queries over a trail that mixes them with flows and
/// changes agree with a brute-force scan; a flow query never returns one.
#[test]
fn alert_queries_match_a_brute_force_scan() {
    let tmp = TrailDir::new();
    let mut log = AuditLog::open(tmp.path(), cfg(Retention::default())).unwrap();
    let all: Vec<Record> = (0..600).map(|i| if i % 4 == 1 { alert(i) } else { rec(i) }).collect();
    for chunk in all.chunks(64) {
        log.append(chunk).unwrap();
    }
    let alerts = Some(RecordKind::Alert);
    let queries = [
        Query {
            kind: alerts,
            ..Query::default()
        },
        Query {
            kind: alerts,
            vm: Some("vm-3".into()),
            ..Query::default()
        },
        Query {
            kind: alerts,
            zone: Some("db".into()),
            since_ns: Some(T0 + 100 * SEC),
            ..Query::default()
        },
        Query {
            kind: alerts,
            rule: Some("rule-2".into()),
            ..Query::default()
        },
        Query {
            kind: alerts,
            verdict: Some(Verdict::Deny),
            ..Query::default()
        },
        Query {
            kind: Some(RecordKind::Flow),
            ..Query::default()
        },
        Query {
            vm: Some("vm-3".into()),
            ..Query::default()
        },
    ];
    for q in &queries {
        let want: Vec<(u64, Record)> = all
            .iter()
            .enumerate()
            .filter(|(_, r)| q.matches(r))
            .map(|(i, r)| (i as u64 + 1, r.clone()))
            .collect();
        let got = log.query(q).unwrap();
        assert!(got == want, "{q:?}: {} against {}", got.len(), want.len());
    }
    let is_alert = |r: &Record| matches!(r, Record::Alert(_) | Record::AlertsNotRecorded(_));
    let got = log.query(&queries[0]).unwrap();
    assert_eq!(got.len(), all.iter().filter(|r| is_alert(r)).count());
    assert!(got.iter().any(|(_, r)| matches!(r, Record::AlertsNotRecorded(_))));
    assert!(log.query(&queries[4]).unwrap().is_empty(), "alerts have no verdict");
    assert!(!log.query(&queries[5]).unwrap().iter().any(|(_, r)| is_alert(r)));
    // Across kinds, a VM filter finds both its flows and its alerts.
    let vm3 = log.query(&queries[6]).unwrap();
    assert!(vm3.iter().any(|(_, r)| matches!(r, Record::Alert(_))));
    assert!(vm3.iter().any(|(_, r)| matches!(r, Record::Flow(_))));
    assert!(palisade_audit::verify(tmp.path(), None).unwrap().is_ok());
}

#[test]
fn retention_by_age_keeps_the_log_verifiable() {
    let tmp = TrailDir::new();
    let retention = Retention {
        max_age: Some(Duration::from_secs(300)),
        max_bytes: None,
    };
    let mut log = AuditLog::open(tmp.path(), cfg(retention)).unwrap();
    for chunk in recs(0, 600).chunks(50) {
        log.append(chunk).unwrap();
    }
    let now = T0 + 600 * SEC;
    let r = log.apply_retention(now).unwrap();
    assert!(r.segments_deleted > 0, "{r:?}");
    let kept = log.query(&Query::default()).unwrap();
    assert_eq!(kept[0].0, r.first_kept_seq);
    // Whole segments only: the first kept segment holds a record newer than the cut-off.
    let cutoff = now - 300 * SEC;
    assert!(kept.iter().any(|(_, rec)| rec.time_ns() >= cutoff));
    assert!(kept[0].1.time_ns() <= cutoff + 60 * SEC);
    // The deletion is itself on the record.
    let last = kept.last().unwrap();
    assert!(
        matches!(&last.1, Record::Change(c) if c.action == "audit.retention"),
        "{last:?}"
    );
    assert_eq!(last.0, 601);
    // Nothing young enough is deleted by a second run.
    assert_eq!(log.apply_retention(now).unwrap().segments_deleted, 0);
    drop(log);
    let v = verify(tmp.path(), None).unwrap();
    assert!(v.is_ok(), "{:#?}", v.problems);
    assert_eq!(v.first_seq, r.first_kept_seq);
    // Reopening after retention works and continues the chain.
    let mut log = AuditLog::open(tmp.path(), cfg(Retention::default())).unwrap();
    assert_eq!(log.append(&recs(600, 610)).unwrap(), 611);
    drop(log);
    assert!(verify(tmp.path(), None).unwrap().is_ok());
}

#[test]
fn retention_by_size_keeps_the_log_verifiable() {
    let tmp = TrailDir::new();
    let retention = Retention {
        max_age: None,
        max_bytes: Some(64 << 10),
    };
    let mut log = AuditLog::open(tmp.path(), cfg(retention)).unwrap();
    for chunk in recs(0, 1000).chunks(100) {
        log.append(chunk).unwrap();
    }
    let size = |dir: &std::path::Path| -> u64 {
        palisade_audit::segment::list_segments(dir)
            .unwrap()
            .iter()
            .map(|(_, p)| std::fs::metadata(p).unwrap().len())
            .sum()
    };
    assert!(size(tmp.path()) > 64 << 10);
    let r = log.apply_retention(T0).unwrap();
    assert!(r.segments_deleted > 0 && r.bytes_freed > 0, "{r:?}");
    // At most the last sealed segment plus the active one over the limit.
    assert!(
        size(tmp.path()) <= (64 << 10) + (16 << 10) + 4096,
        "{}",
        size(tmp.path())
    );
    drop(log);
    let v = verify(tmp.path(), None).unwrap();
    assert!(v.is_ok(), "{:#?}", v.problems);
    // Forged retention: delete the first kept segment by hand — not explained by a signed entry.
    let segs = palisade_audit::segment::list_segments(tmp.path()).unwrap();
    std::fs::remove_file(&segs[0].1).unwrap();
    let v = verify(tmp.path(), None).unwrap();
    assert_eq!(v.problems[0].kind, ProblemKind::UnexplainedStart, "{:#?}", v.problems);
}

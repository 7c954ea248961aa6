//! Exporting a stored log as JSON lines and IPFIX.

mod common;

use std::net::UdpSocket;
use std::time::Duration;

use common::*;
use palisade_audit::export::{to_ipfix, to_json_lines};
use palisade_audit::ipfix::{Decoder, IpfixExporter};
use palisade_audit::record::Record;
use palisade_audit::{AuditConfig, AuditLog, LogReader, Query, RecordKind};

#[test]
fn json_lines_and_ipfix_carry_the_stored_records() {
    let tmp = TrailDir::new();
    let mut log = AuditLog::open(
        tmp.path(),
        AuditConfig {
            segment_bytes: 8192,
            ..AuditConfig::default()
        },
    )
    .unwrap();
    let all = recs(0, 120);
    log.append(&all).unwrap();
    drop(log);
    let reader = LogReader::open(tmp.path()).unwrap();

    let mut buf = Vec::new();
    assert_eq!(to_json_lines(&reader, &Query::default(), &mut buf).unwrap(), 120);
    let back: Vec<Record> = palisade_audit::jsonl::read_lines(&buf[..])
        .map(Result::unwrap)
        .collect();
    assert_eq!(back, all);

    let collector = UdpSocket::bind("127.0.0.1:0").unwrap();
    collector.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut exporter = IpfixExporter::connect(collector.local_addr().unwrap(), 7).unwrap();
    let q = Query {
        kind: Some(RecordKind::Flow),
        vm: Some("vm-2".into()),
        ..Query::default()
    };
    let want = all.iter().filter(|r| q.matches(r)).count() as u64;
    let done = to_ipfix(&reader, &q, &mut exporter, || 1_700_000_000).unwrap();
    assert_eq!((done.flows, done.changes_skipped, done.rate_limited), (want, 0, 0));
    let stats = exporter.stats();
    assert_eq!(stats.records_exported, want);
    let mut decoded = 0;
    // Templates are sent once, then data sets refer to them: decode with state.
    let mut decoder = Decoder::new();
    let mut pkt = vec![0u8; 65536];
    for _ in 0..stats.messages_sent {
        let n = collector.recv(&mut pkt).unwrap();
        decoded += decoder.decode(&pkt[..n]).unwrap().records.len() as u64;
    }
    assert_eq!(decoded, stats.data_records_sent);
    assert!(decoded >= want);
}

//! Throughput of the IPFIX exporter: flow records encoded per second, and
//! encoded and sent over loopback UDP per second. Ignored by default (it
//! measures, it does not check); run with
//! `cargo test -p palisade-audit --release --test ipfix_throughput -- --ignored --nocapture`.
//! Prints one JSON line.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket};
use std::time::Instant;

use palisade_audit::ipfix::{IpfixExporter, encode_message};
use palisade_audit::record::{Decision, EndReason, Endpoint, FlowRecord, Phase, Verdict, VmIdentity};

fn record(i: u64) -> FlowRecord {
    let (src, dst): (IpAddr, IpAddr) = if i % 4 == 0 {
        (
            Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i as u16).into(),
            Ipv6Addr::LOCALHOST.into(),
        )
    } else {
        (
            Ipv4Addr::from(0x0a00_0000 + i as u32).into(),
            Ipv4Addr::new(198, 51, 100, 7).into(),
        )
    };
    let vm = |name: String, zone: &str| VmIdentity {
        name,
        uuid: "6f1c1f8e-0000-4000-8000-000000000000".into(),
        vnic: "eth0".into(),
        zone: zone.into(),
        cluster: None,
        host: None,
        tags: Default::default(),
    };
    FlowRecord {
        appliance: None,
        time_ns: 1_700_000_000_000_000_000 + i,
        flow_id: i,
        host: "hv1".into(),
        phase: Phase::End(EndReason::Fin),
        src: Endpoint {
            addr: src,
            port: 30000 + (i % 30000) as u16,
            vm: Some(vm(format!("web-{i}"), "web")),
        },
        dst: Endpoint {
            addr: dst,
            port: 443,
            vm: Some(vm("db-1".into(), "db")),
        },
        protocol: 6,
        icmp: None,
        verdict: Verdict::Allow,
        decided_by: vec![Decision {
            rule: "web-to-db".into(),
            level: "zone".into(),
            policy_version: 12,
            chain: "egress".into(),
        }],
        packets_out: 10 + i,
        bytes_out: 1000 + i,
        packets_in: 8,
        bytes_in: 9000,
        start_ns: 1_700_000_000_000_000_000,
        last_ns: 1_700_000_001_000_000_000,
    }
}

#[test]
#[ignore = "measurement; run with --ignored --nocapture"]
fn ipfix_export_throughput() {
    const N: u64 = 200_000;
    let records: Vec<FlowRecord> = (0..N).map(record).collect();

    // Encode only, in batches of 8 flow records (16 IPFIX records, about one MTU).
    let t = Instant::now();
    let mut bytes = 0usize;
    for chunk in records.chunks(8) {
        bytes += black_box(encode_message(chunk, 0, 1, 0, false)).len();
    }
    let encode_s = t.elapsed().as_secs_f64();

    // Encode and send to a loopback socket that does not read (the kernel drops
    // what overflows its buffer; the sender is not slowed by a reader).
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut e = IpfixExporter::connect(sink.local_addr().unwrap(), 1).unwrap();
    let t = Instant::now();
    for r in &records {
        e.export(r, 1_700_000_000).unwrap();
    }
    e.flush(1_700_000_000).unwrap();
    let send_s = t.elapsed().as_secs_f64();
    let stats = e.stats();
    assert_eq!(stats.records_exported, N);
    assert_eq!(stats.send_errors, 0);

    println!(
        "{{\"bench\":\"ipfix_export\",\"profile\":\"{}\",\"flow_records\":{N},\"encode_records_per_s\":{:.0},\
         \"encode_mbytes_per_s\":{:.1},\"export_udp_records_per_s\":{:.0},\"messages_sent\":{},\
         \"ipfix_records_per_message\":{:.1}}}",
        if cfg!(debug_assertions) { "dev" } else { "release" },
        N as f64 / encode_s,
        bytes as f64 / encode_s / 1e6,
        N as f64 / send_s,
        stats.messages_sent,
        stats.data_records_sent as f64 / stats.messages_sent as f64,
    );
}

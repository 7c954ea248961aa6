//! The audit store survives `kill -9` mid-append: every acknowledged record
//! is there after reopening, and the only damage is a torn tail after the
//! last acknowledged one, set aside and reported; the head published outside
//! the trail is always one the trail contains. Also the `audit verify`,
//! `flows` and `policy what-if` commands end to end.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use palisade_audit::record::*;
use palisade_audit::{AuditConfig, AuditLog, Query, SignedHead, VerifyOptions, verify_with};

/// A temporary directory removed on drop (the binary crate has no tempfile).
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
        let p = std::env::temp_dir().join(format!("palisade-audit-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// xorshift64*: enough randomness for kill timing, seeded from the clock and printed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

#[test]
fn kill_9_loses_no_acknowledged_record() {
    let root = TempDir::new("crash");
    // The trail in its own directory, its key and published head beside it.
    let dir = TempDir(root.0.join("trail"));
    let key = root.0.join("audit.key");
    let head = root.0.join("audit.head");
    let config = || AuditConfig {
        key_file: Some(key.clone()),
        head_file: Some(head.clone()),
        ..AuditConfig::default()
    };
    let seed = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    println!("seed {seed}");
    let mut rng = Rng(seed);
    let mut acked_total = 0u64;
    for round in 0..4 {
        let batch = 1 + rng.below(40);
        let mut child = Command::new(env!("CARGO_BIN_EXE_palisade"))
            .args(["audit", "append-test"])
            .arg(&dir.0)
            .args([
                "--count",
                "10000000",
                "--batch",
                &batch.to_string(),
                "--segment-bytes",
                "65536",
            ])
            .arg("--key-file")
            .arg(&key)
            .arg("--head-file")
            .arg(&head)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut last = 0u64;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                last = line.trim().parse().expect("append-test prints sequence numbers");
            }
            last
        });
        std::thread::sleep(Duration::from_millis(150 + rng.below(500)));
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        let acked = reader.join().unwrap();
        println!("round {round}: batch {batch}, last acknowledged seq {acked}");
        assert!(acked >= acked_total, "acknowledged seqs went backwards");
        acked_total = acked;

        // Before recovery: intact, or only a torn tail after the last
        // acknowledged record; and the trail contains the published head.
        let published = SignedHead::read(&head).unwrap();
        let opts = VerifyOptions {
            key: None,
            expect_head: published.map(|h| (h, head.display().to_string())),
        };
        let report = verify_with(&dir.0, &opts).unwrap();
        assert!(report.only_torn_tail(), "round {round}: {:#?}", report.problems);
        for p in &report.problems {
            assert!(
                p.seq.unwrap() > acked,
                "round {round}: torn tail at or before an acked seq: {p}"
            );
        }
        // Recovery sets it aside, reports it, and keeps every acknowledged record.
        let log = AuditLog::open(&dir.0, config()).unwrap();
        assert_eq!(log.recovery().torn.len(), report.problems.len(), "{:?}", log.recovery());
        println!("round {round}: recovery {:?}", log.recovery());
        for t in &log.recovery().torn {
            assert!(t.last_intact_seq >= acked && t.moved_to.exists(), "{t:?}");
        }
        assert!(log.last_seq() >= acked);
        let all = log.query(&Query::default()).unwrap();
        let seqs: Vec<u64> = all.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, (1..=log.last_seq()).collect::<Vec<_>>());
        drop(log);
        let opts = VerifyOptions {
            key: None,
            expect_head: SignedHead::read(&head)
                .unwrap()
                .map(|h| (h, head.display().to_string())),
        };
        let after = verify_with(&dir.0, &opts).unwrap();
        assert!(after.is_ok(), "round {round} after recovery: {:#?}", after.problems);
        assert!(after.head_seq.is_some(), "round {round}: no head published: {after:?}");
    }
    assert!(acked_total > 0, "the appender never acknowledged anything");
}

fn palisade(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(args)
        .output()
        .unwrap()
}

fn flow(
    t: u64,
    src: (&str, u16, Option<&str>),
    dst: (&str, u16, Option<&str>),
    verdict: Verdict,
    rule: &str,
) -> Record {
    let ep = |(a, port, vm): (&str, u16, Option<&str>)| Endpoint {
        addr: a.parse().unwrap(),
        port,
        vm: vm.map(|n| VmIdentity {
            name: n.into(),
            uuid: String::new(),
            vnic: format!("{n}.0"),
            zone: n.split('-').next().unwrap().into(),
            cluster: Some("prod".into()),
            host: None,
            tags: Default::default(),
        }),
    };
    Record::Flow(FlowRecord {
        appliance: None,
        time_ns: t,
        flow_id: t,
        host: "hv1".into(),
        phase: Phase::Start,
        src: ep(src),
        dst: ep(dst),
        protocol: 6,
        icmp: None,
        verdict,
        decided_by: vec![Decision {
            rule: rule.into(),
            level: "zone".into(),
            policy_version: 0,
            chain: "egress".into(),
        }],
        packets_out: 1,
        bytes_out: 60,
        packets_in: 0,
        bytes_in: 0,
        start_ns: t,
        last_ns: t,
    })
}

#[test]
fn verify_flows_and_what_if_from_the_command_line() {
    let dir = TempDir::new("cli");
    let root = TempDir::new("cli-key");
    let key = root.0.join("audit.key");
    let log_dir = dir.0.join("log");
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
    let min = 60_000_000_000;
    let internet = ("203.0.113.5", 50000, None);
    let web1 = ("10.0.1.11", 443, Some("web-1"));
    let db1 = ("10.0.3.31", 5432, Some("db-1"));
    let records = vec![
        // Denied then; the candidate (three-tier) policy allows https to the web tier.
        flow(now - 30 * min, internet, web1, Verdict::Deny, "old-deny"),
        // Allowed then; the candidate forbids web → db.
        flow(
            now - 20 * min,
            ("10.0.1.11", 40000, Some("web-1")),
            db1,
            Verdict::Allow,
            "old-allow",
        ),
        // Allowed then and now.
        flow(now - 10 * min, internet, web1, Verdict::Allow, "web-from-internet"),
        // Outside the window.
        flow(now - 48 * 60 * min, internet, web1, Verdict::Deny, "old-deny"),
    ];
    let config = AuditConfig {
        key_file: Some(key.clone()),
        ..AuditConfig::default()
    };
    let mut log = AuditLog::open(&log_dir, config).unwrap();
    log.append(&records).unwrap();
    drop(log);
    let d = log_dir.to_str().unwrap();

    let out = palisade(&["audit", "verify", d]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("intact: 4 records"));

    let out = palisade(&["flows", "--dir", d, "--vm", "db-1", "--json"]);
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["seq"], 2);
    let out = palisade(&["flows", "--dir", d, "--verdict", "deny", "--since", "1h"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("1 record(s)") && text.contains("old-deny"), "{text}");

    let policy = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/three-tier");
    let out = palisade(&["policy", "what-if", "--policy", policy, "--audit", d, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["evaluated"], 3, "{v}");
    let changed = v["changed"].as_array().unwrap();
    assert_eq!(changed.len(), 2, "{v}");
    assert_eq!(
        (
            changed[0]["seq"].as_u64(),
            changed[0]["old"].as_str(),
            changed[0]["new"].as_str()
        ),
        (Some(1), Some("deny"), Some("allow"))
    );
    assert!(changed[0]["new_rules"].to_string().contains("web-from-internet"), "{v}");
    assert_eq!(
        (changed[1]["seq"].as_u64(), changed[1]["new"].as_str()),
        (Some(2), Some("deny"))
    );
    assert!(changed[1]["new_rules"].to_string().contains("prod-no-web-to-db"), "{v}");

    // Export: JSON lines to stdout read back as the records appended; IPFIX to a UDP socket.
    let out = palisade(&["audit", "export", "--dir", d, "--json", "-"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let back: Vec<palisade_audit::record::Record> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(back, records);
    let collector = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    collector
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let to = collector.local_addr().unwrap().to_string();
    let out = palisade(&["audit", "export", "--dir", d, "--ipfix", &to, "--vm", "db-1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut buf = [0u8; 2048];
    let n = collector.recv(&mut buf).unwrap();
    let decoded = palisade_audit::ipfix::decode_message(&buf[..n]).unwrap();
    assert!(
        !decoded.is_empty(),
        "the web-1 → db-1 flow arrives as IPFIX data records"
    );
    let out = palisade(&["audit", "export", "--dir", d]);
    assert!(!out.status.success(), "a destination is required");

    // Tampering makes verify fail with the location.
    let seg = palisade_audit::segment::list_segments(&log_dir).unwrap()[0].1.clone();
    let frames = palisade_audit::segment::frame_offsets(&seg).unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[frames[1].0 as usize + 30] ^= 1;
    std::fs::write(&seg, bytes).unwrap();
    let out = palisade(&["audit", "verify", d]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("byte {} seq 2: Modified", frames[1].0)),
        "{text}"
    );
    let out = palisade(&["audit", "verify", d, "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["problems"][0]["kind"], "modified");
    // A directory that is not a log is a clear error.
    let out = palisade(&["audit", "verify", dir.0.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no audit segments"));
}

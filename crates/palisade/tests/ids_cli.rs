//! `palisade ids`: refused rules are reported with line and column, and a
//! capture written here (no shared corpus needed) comes out as EVE records.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use palisade_io::capture::{CaptureWriter, LinkType};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("palisade-ids-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn palisade(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(args)
        .output()
        .unwrap()
}

/// An IPv4/UDP packet from 10.0.0.1:5353 to 10.0.0.2:53.
fn udp(payload: &[u8]) -> Vec<u8> {
    let total = 28 + payload.len();
    let mut p = vec![
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        0,
        0,
        0,
        64,
        17,
        0,
        0,
        10,
        0,
        0,
        1,
        10,
        0,
        0,
        2,
    ];
    let ulen = 8 + payload.len();
    p.extend_from_slice(&[0x14, 0xe9, 0, 53, (ulen >> 8) as u8, ulen as u8, 0, 0]);
    p.extend_from_slice(payload);
    p
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[test]
fn refused_rules_are_located_and_the_rest_load_when_asked() {
    let d = dir("check");
    let rules = d.join("r.rules");
    write(
        &rules,
        "alert udp any any -> any any (content:\"evil\"; sid:1;)\nalert udp any any -> any any (content:\"x\"; lua:a.lua; sid:2;)\n",
    );
    let out = palisade(&["ids", "check", "--rules", rules.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2, column 44: keyword `lua`"), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 rule(s) loaded, 1 refused"));
    // `run` refuses the file unless told to skip refused rules.
    let pcap = d.join("c.pcap");
    let mut w = CaptureWriter::create(&pcap, LinkType::RAW).unwrap();
    w.write(Duration::from_secs(1_700_000_000), &udp(b"an evil query"))
        .unwrap();
    w.finish().unwrap();
    let eve = d.join("eve.json");
    let args = [
        "ids",
        "run",
        "--rules",
        rules.to_str().unwrap(),
        "--pcap",
        pcap.to_str().unwrap(),
        "--eve",
        eve.to_str().unwrap(),
    ];
    assert!(!palisade(&args).status.success());
    let mut skip = args.to_vec();
    skip.push("--skip-invalid");
    let out = palisade(&skip);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&eve).unwrap();
    let records: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let alert = records.iter().find(|r| r["event_type"] == "alert").expect("an alert");
    assert_eq!(alert["alert"]["signature_id"], 1);
    assert_eq!(alert["pcap_cnt"], 1);
    assert_eq!(alert["src_ip"], "10.0.0.1");
    assert_eq!(alert["dest_port"], 53);
    assert_eq!(alert["proto"], "UDP");
    assert_eq!(alert["timestamp"], "2023-11-14T22:13:20.000000+0000");
    let flow = records
        .iter()
        .find(|r| r["event_type"] == "flow")
        .expect("a flow record");
    assert_eq!(flow["flow"]["alerted"], true);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn ips_mode_drops_and_the_suricata_yaml_chooses_the_records() {
    let d = dir("ips");
    let rules = d.join("r.rules");
    write(&rules, "drop udp any any -> any any (content:\"evil\"; sid:7;)\n");
    let yaml = d.join("suricata.yaml");
    write(
        &yaml,
        "%YAML 1.1\n---\noutputs:\n  - eve-log:\n      enabled: yes\n      types:\n        - alert\n        - drop:\n            alerts: yes\n            flows: all\n",
    );
    let pcap = d.join("c.pcap");
    let mut w = CaptureWriter::create(&pcap, LinkType::RAW).unwrap();
    for i in 0..3 {
        w.write(Duration::from_secs(1_700_000_000 + i), &udp(b"evil")).unwrap();
    }
    w.finish().unwrap();
    let eve = d.join("eve.json");
    let out = palisade(&[
        "ids",
        "run",
        "--ips",
        "--suricata-yaml",
        yaml.to_str().unwrap(),
        "--rules",
        rules.to_str().unwrap(),
        "--pcap",
        pcap.to_str().unwrap(),
        "--eve",
        eve.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&eve).unwrap();
    let records: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let kinds: Vec<&str> = records.iter().map(|r| r["event_type"].as_str().unwrap()).collect();
    // One alert (the flow is dropped after it), three drops (flows: all), no flow record.
    assert_eq!(kinds, vec!["alert", "drop", "drop", "drop"]);
    assert_eq!(records[0]["alert"]["action"], "blocked");
    assert_eq!(records[1]["drop"]["reason"], "rules");
    assert_eq!(records[1]["alert"]["signature_id"], 7);
    assert_eq!(records[2]["drop"]["reason"], "flow drop");
    let _ = std::fs::remove_dir_all(&d);
}

/// `ids run --threshold FILE`: a `limit` keeps an alert rule to its count,
/// a suppression for the source silences another, and a broken file is
/// refused with its path, line and column.
#[test]
fn a_threshold_config_limits_and_suppresses() {
    let d = dir("threshold");
    let rules = d.join("r.rules");
    write(
        &rules,
        "alert udp any any -> any any (msg:\"a\"; content:\"evil\"; sid:7;)\n\
         alert udp any any -> any any (msg:\"b\"; content:\"evil\"; sid:8;)\n",
    );
    let pcap = d.join("c.pcap");
    let mut w = CaptureWriter::create(&pcap, LinkType::RAW).unwrap();
    for i in 0..5 {
        w.write(Duration::from_secs(1_700_000_000 + i), &udp(b"evil")).unwrap();
    }
    w.finish().unwrap();
    let eve = d.join("eve.json");
    let run = |threshold: &Path| {
        palisade(&[
            "ids",
            "run",
            "--rules",
            rules.to_str().unwrap(),
            "--pcap",
            pcap.to_str().unwrap(),
            "--eve",
            eve.to_str().unwrap(),
            "--threshold",
            threshold.to_str().unwrap(),
        ])
    };
    let sids = || -> Vec<u64> {
        std::fs::read_to_string(&eve)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|r| r["event_type"] == "alert")
            .map(|r| r["alert"]["signature_id"].as_u64().unwrap())
            .collect()
    };
    let t = d.join("threshold.config");
    // Without entries: both alert on every packet.
    write(&t, "# nothing\n");
    assert!(run(&t).status.success());
    assert_eq!(sids().len(), 10);
    write(
        &t,
        "threshold gen_id 1, sig_id 7, type limit, track by_src, count 2, seconds 60\n\
         suppress gen_id 1, sig_id 8, track by_src, ip 10.0.0.0/24\n\
         suppress gen_id 1, sig_id 99\n",
    );
    let out = run(&t);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(sids(), [7, 7]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("line 3: names no loaded signature"),
        "{out:?}"
    );
    write(
        &t,
        "threshold gen_id 1, sig_id 7, type sometimes, track by_src, count 2, seconds 60\n",
    );
    let out = run(&t);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(t.to_str().unwrap()) && err.contains("line 1, column 36") && err.contains("sometimes"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

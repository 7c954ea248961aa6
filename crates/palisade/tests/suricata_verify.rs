//! The suricata-verify floor: every selected test of `../shared/suricata-verify`
//! runs through `palisade ids run` and the tests' own `check.py`, and the
//! number passing must not drop below what the engine reaches today.
//!
//! `SURICATA_VERIFY` overrides the location of the tests (default: `shared/`
//! beside the checkout). The run takes a few seconds: each test is a small
//! capture.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Tests the engine passes today (of 61). Raise it when the engine improves.
const EXPECTED_PASSED: usize = 61;

fn suite() -> PathBuf {
    match std::env::var_os("SURICATA_VERIFY") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/suricata-verify"),
    }
}

#[test]
fn suricata_verify_tests_pass() {
    let sv = suite();
    let tsv = std::fs::read_to_string(sv.join("tests.tsv")).unwrap_or_else(|e| {
        panic!(
            "suricata-verify tests missing at {} ({e}): they need ../shared/suricata-verify next to the checkout, or SURICATA_VERIFY",
            sv.display()
        )
    });
    let out = std::env::temp_dir().join(format!("palisade-sv-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let mut run = 0;
    for line in tsv.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        let [name, _upstream, pcap, settings] = fields[..] else {
            panic!("tests.tsv: bad line {line:?}");
        };
        let dir = sv.join("tests").join(name);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_palisade"));
        std::fs::create_dir_all(out.join(name)).unwrap();
        cmd.args(["ids", "run", "--rules"])
            .arg(dir.join("test.rules"))
            .arg("--pcap")
            .arg(dir.join(pcap))
            .arg("--eve")
            .arg(out.join(name).join("eve.json"));
        for s in settings.split(',') {
            match s {
                "ips" => {
                    cmd.arg("--ips");
                }
                "checksum-off" => {
                    cmd.arg("--checksum-off");
                }
                "midstream" => {
                    cmd.arg("--midstream");
                }
                "inline-stream" => {
                    cmd.arg("--inline-stream");
                }
                "suricata.yaml" => {
                    cmd.arg("--suricata-yaml").arg(dir.join("suricata.yaml"));
                }
                "-" => {}
                other => panic!("{name}: unknown setting {other}"),
            }
        }
        let result = cmd.output().expect("running palisade");
        assert!(
            result.status.success(),
            "{name}: palisade ids run failed: {}",
            String::from_utf8_lossy(&result.stderr)
        );
        run += 1;
    }
    let check = Command::new("python3")
        .arg(sv.join("check.py"))
        .arg("--all")
        .arg(sv.join("tests"))
        .arg("--eve-dir")
        .arg(&out)
        .output()
        .expect("python3 runs check.py (standard library only)");
    let report = String::from_utf8_lossy(&check.stdout);
    let _ = std::fs::remove_dir_all(&out);
    let tally = report
        .lines()
        .find_map(|l| l.strip_prefix("suricata-verify: "))
        .unwrap_or_else(|| {
            panic!(
                "no tally from check.py:\n{report}\n{}",
                String::from_utf8_lossy(&check.stderr)
            )
        });
    let passed: usize = tally.split(' ').next().and_then(|n| n.parse().ok()).expect("N passed");
    let failures: Vec<&str> = report.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert!(run > 0);
    assert!(
        passed >= EXPECTED_PASSED,
        "suricata-verify: {tally} (expected at least {EXPECTED_PASSED} passed)\n{}",
        failures.join("\n")
    );
}

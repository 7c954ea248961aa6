//! `palisade policy` on hostile policy files: a non-zero exit and the
//! positioned diagnostic, never a crash, a hang or a silently shorter policy.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{SystemTime, UNIX_EPOCH};

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
        let p = std::env::temp_dir().join(format!("palisade-policy-cli-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn palisade(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(args)
        .output()
        .expect("run palisade")
}

/// `palisade ARGS…` fails with `needle` in what it prints.
fn fails_with(args: &[&str], needle: &str) {
    let out = palisade(args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{args:?}: {text}");
    assert!(text.contains(needle), "{args:?}: no {needle:?} in\n{text}");
    assert!(text.len() < 10_000, "{args:?}: {} bytes of output", text.len());
}

const POLICY: &str = "datacenter: { name: dc1, default: allow }\nzones: [{ name: web, vlan: 100 }]\n";

#[test]
fn hostile_policy_files_fail_with_a_positioned_message() {
    let dir = TempDir::new("hostile");
    let file = dir.0.join("policy.yaml");
    let path = file.to_str().unwrap();
    // 30,000 nested block sequences: the old parser overflowed its stack.
    std::fs::write(&file, format!("{}x\n", "- ".repeat(30_000))).unwrap();
    fails_with(&["policy", "check", path], "policy.yaml:1:129: error[limit-exceeded]");
    // A NUL in a comment, then a rule: the old loader read 0 rules, exit 0,
    // and `explain` answered allow.
    let nul =
        format!("{POLICY}# \0\nrules:\n  datacenter:\n    - {{ id: deny-all, from: any, to: any, action: deny }}\n");
    std::fs::write(&file, nul).unwrap();
    fails_with(&["policy", "check", path], "policy.yaml:3:3: error[bad-character]");
    fails_with(
        &[
            "policy",
            "explain",
            path,
            "--from",
            "10.0.0.1",
            "--to",
            "10.0.0.2",
            "--service",
            "tcp/22",
        ],
        "policy.yaml:3:3",
    );
    // A FIFO among the files: named, and not waited on.
    std::fs::write(&file, POLICY).unwrap();
    let fifo = std::ffi::CString::new(dir.0.join("extra.yaml").to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    fails_with(&["policy", "check", dir.0.to_str().unwrap()], "extra.yaml is a FIFO");
}

#[test]
fn warnings_are_printed_by_check_and_by_the_commands_that_go_on() {
    let dir = TempDir::new("warn");
    let file = dir.0.join("policy.yaml");
    std::fs::write(
        &file,
        format!("{POLICY}rules:\n  datacenter:\n    - {{ id: admin, from: 10.9.0.77/16, to: any, action: allow }}\n"),
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let out = palisade(&["policy", "check", path]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("warning[host-bits-set]") && stdout.contains("10.9.0.0/16"),
        "{stdout}"
    );
    let out = palisade(&["policy", "analyze", path]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("warning[host-bits-set]"));
}

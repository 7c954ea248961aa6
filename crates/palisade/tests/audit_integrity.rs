//! `palisade audit verify --expect-head`: a head published outside the trail
//! catches what the trail alone cannot (issue 22, item 9): a tail cut to a
//! consistent prefix, the last segment deleted with its checkpoints, an
//! older copy of the whole directory restored. The head file here is made by
//! hand from the trail's last signed checkpoint, so the test does not depend
//! on the writer's publisher.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use palisade_audit::checkpoint::{CHECKPOINT_LEN, Checkpoint, to_hex};
use palisade_audit::record::*;
use palisade_audit::segment::{frame_offsets, list_segments};
use palisade_audit::{AuditConfig, AuditLog};

/// A temporary directory removed on drop (the binary crate has no tempfile).
struct TempDir(PathBuf);

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

fn record(i: u64) -> Record {
    Record::Change(ChangeRecord {
        time_ns: 1_700_000_000_000_000_000 + i * 1_000_000_000,
        actor: "alice".into(),
        action: "vm.tag".into(),
        resource: format!("vm/vm-{}", i % 5),
        diff: format!("+n={i}"),
        policy_version: Some(i),
    })
}

/// A trail of `n` records in segments of 2 KiB, signed every 5, the key in
/// `root/keys`, with a head file made from its last checkpoint.
fn build(root: &Path, n: u64) -> (PathBuf, PathBuf) {
    build_with_seed(root, n, "4b")
}

/// The JSON head document of the trail's last signed checkpoint.
fn head_json(dir: &Path) -> String {
    let last = list_segments(dir).unwrap().pop().unwrap().1;
    let ck = std::fs::read(last.with_extension("ckpt")).unwrap();
    let c = Checkpoint::parse(&ck[ck.len() - CHECKPOINT_LEN..]).unwrap();
    let public = std::fs::read_to_string(dir.join("audit.pub")).unwrap();
    serde_json::json!({
        "seq": c.seq,
        "hash": to_hex(&c.hash),
        "time_ns": c.time_ns,
        "signature": to_hex(&c.signature),
        "public_key": public.trim(),
    })
    .to_string()
}

fn verify(dir: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["audit", "verify"])
        .arg(dir)
        .args(extra)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn an_external_head_catches_cuts_deletions_and_rollbacks() {
    type Attack = fn(&Path);
    let attacks: Vec<(&str, Attack)> = vec![
        ("cut the tail to a consistent prefix", |dir| {
            let seg = list_segments(dir).unwrap().pop().unwrap().1;
            let fr = frame_offsets(&seg).unwrap();
            assert!(fr.len() >= 2, "want two records in the last segment");
            let first: u64 =
                palisade_audit::segment::parse_segment_name(seg.file_name().unwrap().to_str().unwrap()).unwrap();
            // Keep the first record of the last segment, and only the checkpoints up to it.
            let keep_seq = first;
            let d = std::fs::read(&seg).unwrap();
            std::fs::write(&seg, &d[..fr[1].0 as usize]).unwrap();
            let ck = seg.with_extension("ckpt");
            let entries = std::fs::read(&ck).unwrap();
            let kept: Vec<u8> = entries
                .chunks_exact(CHECKPOINT_LEN)
                .filter(|e| Checkpoint::parse(e).unwrap().seq <= keep_seq)
                .flatten()
                .copied()
                .collect();
            std::fs::write(&ck, kept).unwrap();
        }),
        ("delete the last segment with its checkpoints", |dir| {
            let seg = list_segments(dir).unwrap().pop().unwrap().1;
            for ext in ["log", "ckpt", "idx"] {
                let _ = std::fs::remove_file(seg.with_extension(ext));
            }
        }),
        ("restore an older copy of the directory", |dir| {
            let old = dir.with_extension("old");
            assert!(old.exists());
            std::fs::remove_dir_all(dir).unwrap();
            std::fs::rename(&old, dir).unwrap();
        }),
    ];
    for (name, attack) in attacks {
        let root = TempDir::new("head");
        let (dir, _) = build(&root.0, 20);
        copy_dir(&dir, &dir.with_extension("old"));
        // The trail goes on after the copy was taken; its newest head is published.
        let (dir, head) = {
            let key = root.0.join("keys/audit.key");
            let config = AuditConfig {
                segment_bytes: 2048,
                checkpoint_every: 5,
                key_file: Some(key),
                ..AuditConfig::default()
            };
            let mut log = AuditLog::open(&dir, config).unwrap();
            for i in 20..40 {
                log.append(&[record(i)]).unwrap();
            }
            log.checkpoint(1_900_000_000_000_000_000).unwrap();
            drop(log);
            let head = root.0.join("audit.head");
            std::fs::write(&head, head_json(&dir)).unwrap();
            (dir, head)
        };
        let head_arg = head.to_str().unwrap();
        let (code, text) = verify(&dir, &["--expect-head", head_arg]);
        assert_eq!(code, Some(0), "{name}: the intact trail fails:\n{text}");

        attack(&dir);
        // Alone, with the public key pinned, the trail looks intact: that is
        // what the external head is for.
        let pinned = root.0.join("pinned.pub");
        std::fs::copy(dir.join("audit.pub"), &pinned).unwrap();
        let (alone, text) = verify(&dir, &["--key", pinned.to_str().unwrap()]);
        assert_eq!(alone, Some(0), "{name}: expected undetectable without a head:\n{text}");
        let (code, text) = verify(&dir, &["--expect-head", head_arg]);
        assert_eq!(code, Some(1), "{name}: verify --expect-head passed:\n{text}");
        assert!(
            text.contains("head"),
            "{name}: the report does not name the head:\n{text}"
        );
        let (code, _) = verify(&dir, &["--expect-head", head_arg, "--key", pinned.to_str().unwrap()]);
        assert_eq!(code, Some(1), "{name}: verify --expect-head --key passed");
    }
}

#[test]
fn a_head_of_another_trail_or_key_is_refused() {
    let root = TempDir::new("head-key");
    let (dir, head) = build(&root.0, 12);
    let other = TempDir::new("head-other");
    let (other_dir, other_head) = build_with_seed(&other.0, 12, "6c");
    // A head signed by another key: a clear failure, not "intact".
    let (code, text) = verify(&dir, &["--expect-head", other_head.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{text}");
    // --key and the head's key disagree: refused before anything is read.
    let (code, text) = verify(
        &dir,
        &[
            "--expect-head",
            head.to_str().unwrap(),
            "--key",
            other_dir.join("audit.pub").to_str().unwrap(),
        ],
    );
    assert_ne!(code, Some(0), "{text}");
    // A head file that is not a head is a clear error naming it.
    std::fs::write(&head, "{\"seq\": 1}").unwrap();
    let (code, text) = verify(&dir, &["--expect-head", head.to_str().unwrap()]);
    assert_ne!(code, Some(0));
    assert!(text.contains("audit.head"), "{text}");
}

/// [`build`] with the signing key made of the hex byte `seed`, repeated.
fn build_with_seed(root: &Path, n: u64, seed: &str) -> (PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let dir = root.join("trail");
    let keys = root.join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let key = keys.join("audit.key");
    std::fs::write(&key, format!("{}\n", seed.repeat(32))).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = AuditConfig {
        segment_bytes: 2048,
        checkpoint_every: 5,
        key_file: Some(key),
        ..AuditConfig::default()
    };
    let mut log = AuditLog::open(&dir, config).unwrap();
    for i in 0..n {
        log.append(&[record(i)]).unwrap();
    }
    log.checkpoint(1_800_000_000_000_000_000).unwrap();
    drop(log);
    let head = root.join("audit.head");
    std::fs::write(&head, head_json(&dir)).unwrap();
    (dir, head)
}

/// `palisade flows` over a trail whose sealed record was edited (same
/// length, so a stale index would just miss it) says so and exits 1 (issue
/// 22, item 12); over an intact trail it answers quietly.
#[test]
fn flows_says_when_what_it_read_fails_verification() {
    let root = TempDir::new("flows");
    let (dir, _) = build(&root.0, 40);
    let flows = |dir: &Path| {
        Command::new(env!("CARGO_BIN_EXE_palisade"))
            .args(["flows", "--changes", "--vm", "vm-1", "--dir"])
            .arg(dir)
            .output()
            .unwrap()
    };
    let out = flows(&dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    let n_before = String::from_utf8_lossy(&out.stdout).lines().count();
    // vm-1 becomes vm-2 in a sealed segment's first record that names vm-1.
    let seg = list_segments(&dir).unwrap()[1].1.clone();
    let mut d = std::fs::read(&seg).unwrap();
    let at = d.windows(7).position(|w| w == b"vm/vm-1").expect("a record of vm-1");
    d[at + 6] = b'2';
    std::fs::write(&seg, &d).unwrap();
    let out = flows(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("fails verification") && err.contains(seg.to_str().unwrap()),
        "{err}"
    );
    // Every other record is still printed; the changed one is not vouched for.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        n_before - 1,
        "{err}"
    );
}

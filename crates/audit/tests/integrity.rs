//! Regression tests of issue 22 ("Audit trail", items 7 to 12): each was
//! written against the code before its fix and failed there.
//!
//! The trails here keep their signing key outside the trail directory, in a
//! key file the test creates (mode 0600), so the same setup runs against the
//! store before and after the key rules of item 10.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::*;
use palisade_audit::checkpoint::{Checkpoint, Purpose, read_signing_key};
use palisade_audit::index::SegmentIndex;
use palisade_audit::record::Record;
use palisade_audit::segment::{HEADER_LEN, frame_offsets, list_segments, parse_segment_name};
use palisade_audit::{AuditConfig, AuditLog, LogReader, ProblemKind, Query, VerifyReport, verify};

/// A trail directory and a key file beside it (not in it), removed on drop.
struct Trail {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    key: PathBuf,
}

impl Trail {
    fn new() -> Trail {
        Trail::with_seed(0x5a)
    }

    /// A trail whose key's seed is 32 times `seed`.
    fn with_seed(seed: u8) -> Trail {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("trail");
        let keys = tmp.path().join("keys");
        fs::create_dir_all(&keys).unwrap();
        fs::set_permissions(&keys, fs::Permissions::from_mode(0o700)).unwrap();
        let key = keys.join("audit.key");
        fs::write(&key, format!("{}\n", format!("{seed:02x}").repeat(32))).unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        Trail { _tmp: tmp, dir, key }
    }

    fn config(&self, segment_bytes: u64, checkpoint_every: u64) -> AuditConfig {
        AuditConfig {
            segment_bytes,
            checkpoint_every,
            checkpoint_interval: std::time::Duration::from_secs(3600),
            key_file: Some(self.key.clone()),
            ..AuditConfig::default()
        }
    }

    /// Append records `0..n` in batches of 5 and sign a checkpoint at the end.
    fn build(&self, n: u64, segment_bytes: u64, checkpoint_every: u64) -> Vec<PathBuf> {
        let mut log = AuditLog::open(&self.dir, self.config(segment_bytes, checkpoint_every)).unwrap();
        for chunk in recs(0, n).chunks(5) {
            log.append(chunk).unwrap();
        }
        log.checkpoint(T0 + (n + 100) * SEC).unwrap();
        drop(log);
        self.segments()
    }

    fn segments(&self) -> Vec<PathBuf> {
        list_segments(&self.dir).unwrap().into_iter().map(|(_, p)| p).collect()
    }

    fn verify(&self) -> VerifyReport {
        verify(&self.dir, None).unwrap()
    }
}

fn first_seq(seg: &Path) -> u64 {
    parse_segment_name(seg.file_name().unwrap().to_str().unwrap()).unwrap()
}

fn seqs(v: &[(u64, Record)]) -> Vec<u64> {
    v.iter().map(|(s, _)| *s).collect()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn listing(r: &VerifyReport) -> String {
    r.problems.iter().map(|p| format!("  {p}\n")).collect()
}

/// Item 7: flipping the last byte of the last (signed) record's payload,
/// then restarting the writer and appending, must not erase the record:
/// recovery never calls a signed record torn, and verify reports the edit.
#[test]
fn a_restart_never_sets_a_signed_record_aside() {
    let t = Trail::new();
    let segs = t.build(60, 4096, 4);
    let last = segs.last().unwrap().clone();
    let fr = frame_offsets(&last).unwrap();
    let (off, len) = *fr.last().unwrap();
    let mut d = fs::read(&last).unwrap();
    d[off as usize + 4 + len as usize - 1] ^= 0x01;
    fs::write(&last, &d).unwrap();

    // The writer may refuse to open, or open and append: either way nothing
    // signed is set aside and verify must not call the trail intact.
    if let Ok(mut log) = AuditLog::open(&t.dir, t.config(4096, 4)) {
        assert!(log.recovery().torn.is_empty(), "{:?}", log.recovery());
        log.append(&recs(60, 61)).unwrap();
        log.checkpoint(T0 + 500 * SEC).unwrap();
    }
    let bytes_now = fs::read(&last).unwrap();
    assert_eq!(
        &bytes_now[..d.len()],
        &d[..],
        "the edited segment must be kept as it was"
    );
    let r = t.verify();
    assert!(!r.is_ok(), "a changed signed record verified as intact");
    assert!(
        r.problems
            .iter()
            .any(|p| p.kind == ProblemKind::Modified && p.offset == Some(off) && p.seq == Some(60)),
        "want Modified at byte {off} seq 60:\n{}",
        listing(&r)
    );
}

/// Item 7, verify's side: two validly signed checkpoints for one sequence
/// number with different hashes are a forked history, whichever matches.
#[test]
fn two_signed_heads_for_one_seq_are_flagged() {
    let t = Trail::new();
    let segs = t.build(30, 1 << 20, 1000);
    let ckpt = segs.last().unwrap().with_extension("ckpt");
    let key = read_signing_key(&t.key).unwrap();
    // A second, validly signed checkpoint for seq 30 over another hash,
    // written before the true one (verify used to keep only the later).
    let forged = Checkpoint::sign(&key, Purpose::Checkpoint, 30, [7; 32], T0 + 200 * SEC);
    let mut d = fs::read(&ckpt).unwrap();
    let n = d.len();
    let mut out = d[..n - 112].to_vec();
    out.extend_from_slice(&forged.emit());
    out.extend_from_slice(&d[n - 112..]);
    d = out;
    fs::write(&ckpt, &d).unwrap();
    let r = t.verify();
    assert!(!r.is_ok(), "two signed heads for seq 30 verified as intact");
    assert!(
        r.problems.iter().any(|p| p.seq == Some(30) && p.file == ckpt),
        "want a problem at seq 30 in {}:\n{}",
        ckpt.display(),
        listing(&r)
    );
}

/// Item 8: a zeroed length field in the middle of the active segment must
/// not make the next open move every later (acknowledged) record aside.
#[test]
fn recovery_never_discards_acknowledged_records() {
    let t = Trail::new();
    let segs = t.build(200, 1 << 20, 1000);
    assert_eq!(segs.len(), 1);
    let seg = &segs[0];
    let fr = frame_offsets(seg).unwrap();
    assert_eq!(fr.len(), 200);
    let original = fs::read(seg).unwrap();
    let mut d = original.clone();
    let at = fr[99].0 as usize;
    d[at..at + 4].fill(0);
    fs::write(seg, &d).unwrap();
    let before = t.verify();
    assert!(!before.is_ok());

    if let Ok(mut log) = AuditLog::open(&t.dir, t.config(1 << 20, 1000)) {
        log.append(&recs(200, 201)).unwrap();
    }
    // Every acknowledged record's bytes are still where they were.
    let after = fs::read(seg).unwrap();
    assert!(
        after.len() >= d.len(),
        "the segment was cut from {} to {} bytes",
        d.len(),
        after.len()
    );
    assert_eq!(&after[..d.len()], &d[..], "recovery changed acknowledged bytes");
    let r = t.verify();
    assert!(!r.is_ok(), "verify calls a trail with a zeroed length field intact");
    assert_eq!(r.problems[0].offset, Some(fr[99].0), "{}", listing(&r));
}

/// Item 10: the signing key never lives in the trail directory.
#[test]
fn the_signing_key_lives_outside_the_trail() {
    // The default key location is not inside the trail directory.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("trail");
    drop(AuditLog::open(&dir, AuditConfig::default()).unwrap());
    for entry in fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(
            !name.ends_with(".key"),
            "a key file {name} was created in the trail directory"
        );
    }

    // A key file configured inside the trail directory is refused.
    let t = Trail::new();
    fs::create_dir_all(&t.dir).unwrap();
    let inside = t.dir.join("my.key");
    fs::copy(&t.key, &inside).unwrap();
    fs::set_permissions(&inside, fs::Permissions::from_mode(0o600)).unwrap();
    let e = AuditLog::open(
        &t.dir,
        AuditConfig {
            key_file: Some(inside.clone()),
            ..AuditConfig::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("my.key"), "{e}");
    fs::remove_file(&inside).unwrap();

    // ... and so is one in a subdirectory of it, reached through a symlink.
    let sub = t.dir.join("sub");
    fs::create_dir_all(&sub).unwrap();
    let link = t.dir.parent().unwrap().join("link");
    std::os::unix::fs::symlink(&sub, &link).unwrap();
    let e = AuditLog::open(
        &t.dir,
        AuditConfig {
            key_file: Some(link.join("k.key")),
            ..AuditConfig::default()
        },
    );
    assert!(
        e.is_err(),
        "a key reached through a symlink into the trail was accepted"
    );

    // A key others can read is refused, naming the file and its mode.
    fs::set_permissions(&t.key, fs::Permissions::from_mode(0o640)).unwrap();
    let e = AuditLog::open(&t.dir, t.config(4096, 4)).unwrap_err().to_string();
    assert!(
        e.contains(t.key.to_str().unwrap()) && e.contains("640"),
        "want the file and its mode in: {e}"
    );
    fs::set_permissions(&t.key, fs::Permissions::from_mode(0o600)).unwrap();
    drop(AuditLog::open(&t.dir, t.config(4096, 4)).unwrap());

    // A legacy key left in the trail directory is refused, saying how to move it ...
    let legacy = t.dir.join("audit.key");
    fs::rename(&t.key, &legacy).unwrap();
    let e = AuditLog::open(&t.dir, t.config(4096, 4)).unwrap_err().to_string();
    assert!(
        e.contains(legacy.to_str().unwrap()) && e.contains(&format!("mv {} {}", legacy.display(), t.key.display())),
        "{e}"
    );
    // ... and once moved the trail opens with it; a copy left behind is refused still.
    fs::copy(&legacy, &t.key).unwrap();
    let e = AuditLog::open(&t.dir, t.config(4096, 4)).unwrap_err().to_string();
    assert!(e.contains(legacy.to_str().unwrap()), "{e}");
    fs::remove_file(&legacy).unwrap();
    drop(AuditLog::open(&t.dir, t.config(4096, 4)).unwrap());
}

/// Item 11: a length flip in the middle of a segment is one problem; the
/// records after it are read (resynchronised by their chain), not missing.
#[test]
fn a_length_flip_is_one_problem_and_the_rest_is_read() {
    for (name, flip) in [
        ("impossible length", (3usize, 0x40u8)),
        ("one byte longer", (0, 0x01)),
        ("much shorter", (1, 0x01)),
    ] {
        let t = Trail::new();
        let segs = t.build(300, 1 << 20, 1000);
        let seg = &segs[0];
        let fr = frame_offsets(seg).unwrap();
        let mut d = fs::read(seg).unwrap();
        d[fr[99].0 as usize + flip.0] ^= flip.1;
        fs::write(seg, &d).unwrap();
        let r = t.verify();
        assert_eq!(r.problems.len(), 1, "{name}:\n{}", listing(&r));
        let p = &r.problems[0];
        assert_eq!(
            (p.kind, p.offset, p.seq),
            (ProblemKind::BadFrame, Some(fr[99].0), Some(100)),
            "{name}: {p}"
        );
        assert_eq!((r.records, r.last_seq), (300, 300), "{name}: {r:?}");
    }
}

/// Item 11: a changed first_seq in a segment header is reported once, not
/// as a broken chain at every record after it.
#[test]
fn a_first_seq_flip_is_reported_once() {
    let t = Trail::new();
    let segs = t.build(300, 64 << 10, 50);
    assert!(segs.len() >= 3);
    let seg = &segs[1];
    let mut d = fs::read(seg).unwrap();
    d[8] ^= 0x04;
    fs::write(seg, &d).unwrap();
    let r = t.verify();
    assert_eq!(r.problems.len(), 1, "{}", listing(&r));
    let p = &r.problems[0];
    assert_eq!(
        (p.kind, &p.file, p.offset),
        (ProblemKind::BadHeader, seg, Some(0)),
        "{p}"
    );
    assert_eq!(r.records, 300);
}

/// Item 11: deleting the second-to-last record of a sealed segment is a
/// deletion (the next segment's header witnesses the last record), not a
/// modification.
#[test]
fn deleting_the_second_to_last_record_of_a_segment_is_a_deletion() {
    let t = Trail::new();
    let segs = t.build(60, 4096, 4);
    let seg = &segs[2];
    let fr = frame_offsets(seg).unwrap();
    assert!(fr.len() >= 3);
    let (off, len) = fr[fr.len() - 2];
    let d = fs::read(seg).unwrap();
    let mut out = d[..off as usize].to_vec();
    out.extend_from_slice(&d[off as usize + 36 + len as usize..]);
    fs::write(seg, out).unwrap();
    let r = t.verify();
    let want_seq = first_seq(seg) + fr.len() as u64 - 2;
    let p = &r.problems[0];
    assert_eq!(
        (p.kind, &p.file, p.offset, p.seq),
        (ProblemKind::Deleted, seg, Some(off), Some(want_seq)),
        "{}",
        listing(&r)
    );
}

/// Item 11: a partial checkpoint entry is located at its own byte, whether
/// or not the entries before it verify with the key given.
#[test]
fn a_partial_checkpoint_entry_is_located_at_its_byte() {
    let t = Trail::new();
    let segs = t.build(30, 1 << 20, 1000);
    let ckpt = segs.last().unwrap().with_extension("ckpt");
    let mut d = fs::read(&ckpt).unwrap();
    let whole = d.len() as u64;
    assert!(whole >= 224 && whole % 112 == 0, "the anchor and checkpoints");
    d.extend_from_slice(&[0x33; 50]);
    fs::write(&ckpt, &d).unwrap();
    // With another trail's public key none of the entries verifies.
    let other = Trail::with_seed(0x77);
    other.build(1, 4096, 4);
    let r = verify(&t.dir, Some(&other.dir.join("audit.pub"))).unwrap();
    let torn = r
        .problems
        .iter()
        .find(|p| p.file == ckpt && p.detail.contains("trailing bytes"))
        .unwrap_or_else(|| panic!("no problem for the partial entry:\n{}", listing(&r)));
    assert_eq!(torn.offset, Some(whole), "{torn}");
}

/// Item 11: the summary's first sequence number is the trail's, even when
/// the last segment is empty (it used to print `seq 61..=60`).
#[test]
fn the_summary_never_runs_backwards() {
    let t = Trail::new();
    let segs = t.build(60, 4096, 4);
    let n = segs.len();
    // Append one record at a time, unsigned, until one starts a new segment.
    let mut log = AuditLog::open(&t.dir, t.config(4096, 1000)).unwrap();
    let mut i = 60;
    while t.segments().len() == n {
        log.append(&recs(i, i + 1)).unwrap();
        i += 1;
    }
    drop(log);
    // A crash tore that first record: only part of it reached the disk.
    let newest = t.segments().pop().unwrap();
    let d = fs::read(&newest).unwrap();
    fs::write(&newest, &d[..HEADER_LEN + 10]).unwrap();
    let log = AuditLog::open(&t.dir, t.config(4096, 1000)).unwrap();
    assert_eq!(log.recovery().torn.len(), 1, "{:?}", log.recovery());
    drop(log);
    let r = t.verify();
    assert!(r.is_ok(), "{}", listing(&r));
    assert_eq!((r.first_seq, r.last_seq), (1, i - 1), "{r:?}");
}

/// Item 12: a same-length edit of a sealed record's zone does not go
/// unnoticed by a query for that zone.
#[test]
fn a_query_over_an_edited_sealed_segment_says_so() {
    let t = Trail::new();
    let segs = t.build(60, 4096, 4);
    let seg = &segs[1];
    let mut d = fs::read(seg).unwrap();
    let at = find(&d, b"\"zone\":\"app\"").expect("a record in zone app");
    d[at + 8..at + 11].copy_from_slice(b"web");
    fs::write(seg, &d).unwrap();
    let q = Query {
        zone: Some("web".into()),
        ..Query::default()
    };
    let reader = LogReader::open(&t.dir);
    let answer = reader.and_then(|r| r.query(&q));
    assert!(
        answer.is_err(),
        "a query over an edited segment answered without a word"
    );
    let log = AuditLog::open(&t.dir, t.config(4096, 4)).unwrap();
    assert!(log.query(&q).is_err(), "the writer's query answered without a word");
}

/// Item 12: an index whose postings were edited (with its checksum fixed)
/// is not trusted: the answer is the segment's.
#[test]
fn a_forged_index_is_not_trusted() {
    let t = Trail::new();
    let segs = t.build(60, 4096, 4);
    let want: Vec<(u64, Record)> = (0..60u64)
        .map(|i| (i + 1, rec(i)))
        .filter(|(_, r)| {
            Query {
                zone: Some("web".into()),
                ..Query::default()
            }
            .matches(r)
        })
        .collect();
    let seg = &segs[1];
    let idx_path = seg.with_extension("idx");
    let mut idx = SegmentIndex::load(&idx_path, first_seq(seg))
        .unwrap()
        .expect("a sealed index");
    let list = idx.postings.get_mut("z:web").expect("zone web in segment 1");
    list.remove(0);
    fs::write(&idx_path, idx.encode()).unwrap();
    let q = Query {
        zone: Some("web".into()),
        ..Query::default()
    };
    match LogReader::open(&t.dir).and_then(|r| r.query(&q)) {
        Ok(got) => assert_eq!(seqs(&got), seqs(&want), "a forged index changed the answer"),
        Err(e) => assert!(e.to_string().contains("index"), "{e}"),
    }
}

// ---- Item 9: signed heads published outside the trail ----

use palisade_audit::{AuditError, HeadPublisher, SignedHead, VerifyOptions, verify_with};

impl Trail {
    fn head(&self) -> PathBuf {
        self.key.parent().unwrap().parent().unwrap().join("audit.head")
    }

    fn with_head(&self, segment_bytes: u64, checkpoint_every: u64) -> AuditConfig {
        AuditConfig {
            head_file: Some(self.head()),
            ..self.config(segment_bytes, checkpoint_every)
        }
    }

    fn verify_head(&self) -> VerifyReport {
        let head = SignedHead::read(&self.head()).unwrap().expect("a published head");
        verify_with(
            &self.dir,
            &VerifyOptions {
                key: None,
                expect_head: Some((head, self.head().display().to_string())),
            },
        )
        .unwrap()
    }
}

/// Every checkpoint is published as the head file, atomically replaced; it
/// verifies, carries the key, and is what the trail's last checkpoint says.
#[test]
fn each_checkpoint_is_published_as_the_head() {
    let t = Trail::new();
    let config = AuditConfig {
        head_every: 1,
        ..t.with_head(4096, 4)
    };
    let mut log = AuditLog::open(&t.dir, config).unwrap();
    let mut seen = Vec::new();
    for chunk in recs(0, 40).chunks(3) {
        log.append(chunk).unwrap();
        if let Some(h) = SignedHead::read(&t.head()).unwrap() {
            assert!(h.verify(), "{h:?}");
            assert_eq!(h.public_key, log.public_key());
            seen.push(h.seq);
        }
    }
    assert!(seen.windows(2).all(|w| w[0] <= w[1]) && seen.len() > 5, "{seen:?}");
    let status = log.status();
    assert_eq!(status.published_seq, Some(status.signed_seq));
    assert_eq!(status.publish_failures, 0);
    log.checkpoint(T0 + 900 * SEC).unwrap();
    assert_eq!(SignedHead::read(&t.head()).unwrap().unwrap().seq, 40);
    drop(log);
    let r = t.verify_head();
    assert!(r.is_ok(), "{}", listing(&r));
    assert_eq!(r.head_seq, Some(40));
    // No temporary files are left beside the head.
    let stray: Vec<_> = fs::read_dir(t.head().parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
}

/// Head publications are bounded (a head file costs two fsyncs): one per
/// `head_every` signed records under load, the pending one by `tick` once
/// the interval has passed, and always at an explicit checkpoint.
#[test]
fn head_publications_are_bounded_and_none_is_lost() {
    let t = Trail::new();
    let config = AuditConfig {
        head_every: 20,
        checkpoint_interval: std::time::Duration::from_secs(5),
        ..t.with_head(1 << 20, 4)
    };
    let mut log = AuditLog::open(&t.dir, config).unwrap();
    let mut published = Vec::new();
    for i in 0..60 {
        log.append(&recs(i, i + 1)).unwrap();
        if let Some(h) = SignedHead::read(&t.head()).unwrap()
            && published.last() != Some(&h.seq)
        {
            published.push(h.seq);
        }
    }
    // Checkpoints every 4 records (or 5 s of record time), heads only every 20 records.
    assert!(published.windows(2).all(|w| w[1] - w[0] >= 20), "{published:?}");
    let s = log.status();
    assert!(s.signed_seq >= 56 && s.published_seq < Some(s.signed_seq), "{s:?}");
    // The pending head goes out with the next tick past the interval ...
    let later = T0 + 1000 * SEC;
    log.tick(later).unwrap();
    assert_eq!(log.status().published_seq, Some(log.status().signed_seq));
    // ... and an explicit checkpoint publishes at once.
    log.append(&recs(60, 62)).unwrap();
    log.checkpoint(later + SEC).unwrap();
    assert_eq!(SignedHead::read(&t.head()).unwrap().unwrap().seq, 62);
}

/// The writer refuses to extend a trail that does not contain its published
/// head (a rollback would otherwise be covered by new heads), and a head
/// file inside the trail directory.
#[test]
fn the_writer_refuses_a_trail_behind_its_head() {
    let t = Trail::new();
    let mut log = AuditLog::open(&t.dir, t.with_head(4096, 4)).unwrap();
    log.append(&recs(0, 20)).unwrap();
    drop(log);
    let older = t.dir.with_extension("older");
    fs::create_dir_all(&older).unwrap();
    for e in fs::read_dir(&t.dir).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), older.join(e.file_name())).unwrap();
    }
    let mut log = AuditLog::open(&t.dir, t.with_head(4096, 4)).unwrap();
    log.append(&recs(20, 40)).unwrap();
    log.checkpoint(T0 + 900 * SEC).unwrap();
    drop(log);
    // Roll back to the older copy (with a torn write at its end: a refused
    // open must not even set that aside).
    fs::remove_dir_all(&t.dir).unwrap();
    fs::rename(&older, &t.dir).unwrap();
    let last = t.segments().pop().unwrap();
    let mut d = fs::read(&last).unwrap();
    d.extend_from_slice(&300u32.to_le_bytes());
    d.extend_from_slice(b"{\"kind\"");
    fs::write(&last, &d).unwrap();
    let before = files_of(&t.dir);
    match AuditLog::open(&t.dir, t.with_head(4096, 4)) {
        Err(AuditError::BehindHead { publisher, reason }) => {
            assert!(
                publisher.contains("audit.head") && reason.contains("seq 40"),
                "{publisher}: {reason}"
            );
        }
        other => panic!("want BehindHead, got {other:?}"),
    }
    assert_eq!(files_of(&t.dir), before, "the refused trail was changed");
    let r = t.verify_head();
    assert!(
        r.problems.iter().any(|p| p.kind == ProblemKind::BehindHead),
        "{}",
        listing(&r)
    );
    // Without the head file the rolled-back trail opens (nothing to compare
    // with); the fork it grows is then caught by verify with the head.
    let mut log = AuditLog::open(&t.dir, t.config(4096, 4)).unwrap();
    log.append(&recs(100, 130)).unwrap();
    log.checkpoint(T0 + 990 * SEC).unwrap();
    drop(log);
    let r = t.verify_head();
    assert_eq!(r.problems[0].kind, ProblemKind::HeadMismatch, "{}", listing(&r));
    // An empty trail under a published head: deleted, not new.
    fs::remove_dir_all(&t.dir).unwrap();
    assert!(matches!(
        AuditLog::open(&t.dir, t.with_head(4096, 4)),
        Err(AuditError::BehindHead { .. })
    ));
    // A head file inside the trail directory is refused.
    let inside = AuditConfig {
        head_file: Some(t.dir.join("audit.head")),
        ..t.config(4096, 4)
    };
    let e = AuditLog::open(&t.dir, inside).unwrap_err().to_string();
    assert!(e.contains("inside the trail"), "{e}");
}

fn files_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().into_string().unwrap(), fs::read(e.path()).unwrap())
        })
        .collect();
    v.sort();
    v
}

/// A publisher that fails: the appends go on, the failures are counted.
struct Failing(u32);

impl HeadPublisher for Failing {
    fn publish(&mut self, _: &SignedHead) -> Result<(), String> {
        self.0 += 1;
        Err(format!("unreachable ({})", self.0))
    }

    fn last_published(&mut self) -> Result<Option<SignedHead>, AuditError> {
        Ok(None)
    }

    fn describe(&self) -> String {
        "a controller".into()
    }
}

#[test]
fn a_failing_publisher_is_counted_not_fatal() {
    let t = Trail::new();
    let config = AuditConfig {
        head_every: 1,
        ..t.config(1 << 20, 5)
    };
    let mut log = AuditLog::open_with(&t.dir, config, vec![Box::new(Failing(0))]).unwrap();
    assert_eq!(log.append(&recs(0, 12)).unwrap(), 12);
    let s = log.status();
    assert_eq!((s.signed_seq, s.published_seq), (12, None), "{s:?}");
    assert!(s.publish_failures >= 1, "{s:?}");
    assert!(s.last_publish_error.unwrap().contains("a controller: unreachable"));
}

/// The unsigned window is bounded in records by appends and in time by
/// `tick`, and reported by `status` and `verify`.
#[test]
fn the_unsigned_window_is_bounded_and_reported() {
    let t = Trail::new();
    let config = AuditConfig {
        checkpoint_every: 10,
        checkpoint_interval: std::time::Duration::from_secs(5),
        ..t.with_head(1 << 20, 10)
    };
    let mut log = AuditLog::open(&t.dir, config).unwrap();
    log.append(&recs(0, 1)).unwrap();
    // The first record is signed at once (nothing was signed for longer than the interval).
    for i in 1..25 {
        log.append(&recs(i, i + 1)).unwrap();
        assert!(log.status().unsigned_records < 10, "{:?}", log.status());
    }
    let s = log.status();
    assert!(s.unsigned_records > 0, "{s:?}");
    assert_eq!((s.checkpoint_every, s.checkpoint_interval_ms), (10, 5000));
    // Time passes with no records: tick signs once the interval is over.
    let last_ckpt = s.last_checkpoint_ns;
    assert!(!log.tick(last_ckpt + 4 * SEC).unwrap());
    assert!(log.tick(last_ckpt + 5 * SEC).unwrap());
    let s = log.status();
    assert_eq!((s.unsigned_records, s.signed_seq), (0, 25));
    // Its head goes out once the interval has passed since the last publication.
    let published = s.published_seq.unwrap();
    log.tick(last_ckpt + 20 * SEC).unwrap();
    assert!(
        published <= 25 && log.status().published_seq == Some(25),
        "{:?}",
        log.status()
    );
    log.append(&recs(25, 28)).unwrap();
    drop(log);
    let r = t.verify();
    assert_eq!((r.signed_through, r.unsigned_records), (25, 3), "{r:?}");
}

/// Item 11: verify streams a segment: the buffers it holds are bounded by
/// its read buffer and the largest frame, not by the segment's size, also
/// when it has to resynchronise after damage.
#[test]
fn verify_memory_is_bounded_by_frames_not_segments() {
    use palisade_audit::segment::READ_BUFFER;
    let t = Trail::new();
    let mut log = AuditLog::open(&t.dir, t.config(64 << 20, 5000)).unwrap();
    for chunk in recs(0, 9000).chunks(1000) {
        log.append(chunk).unwrap();
    }
    drop(log);
    let seg = t.segments().pop().unwrap();
    let size = fs::metadata(&seg).unwrap().len() as usize;
    assert!(
        size > 4 * READ_BUFFER,
        "the segment ({size} bytes) must be larger than the read buffer"
    );
    let largest = frame_offsets(&seg)
        .unwrap()
        .iter()
        .map(|(_, l)| *l as usize)
        .max()
        .unwrap();
    let bound = READ_BUFFER + 4 * largest + (64 << 10) + 4096;
    let r = t.verify();
    assert!(r.is_ok(), "{}", listing(&r));
    assert!(
        r.buffer_bytes <= bound,
        "{} buffer bytes for a {size}-byte segment",
        r.buffer_bytes
    );
    // Damage in the middle: reading resumes after it, still in the same buffers.
    let fr = frame_offsets(&seg).unwrap();
    let mut d = fs::read(&seg).unwrap();
    d[fr[4000].0 as usize + 2] ^= 0x80;
    fs::write(&seg, &d).unwrap();
    let r = t.verify();
    assert_eq!(r.problems.len(), 1, "{}", listing(&r));
    assert!(
        r.buffer_bytes <= bound,
        "{} buffer bytes after a resync",
        r.buffer_bytes
    );
}

/// Item 12: the lenient query says what is wrong; a clean trail queried
/// through indexes it must rebuild (deleted) answers right, with a note.
#[test]
fn a_query_report_names_the_problem_and_rebuilt_indexes_answer_right() {
    let t = Trail::new();
    let segs = t.build(60, 4096, 4);
    let q = Query {
        zone: Some("web".into()),
        ..Query::default()
    };
    let want = LogReader::open(&t.dir).unwrap().query(&q).unwrap();
    for s in &segs {
        let _ = fs::remove_file(s.with_extension("idx"));
    }
    fs::remove_file(t.dir.join("index.json")).unwrap();
    let reader = LogReader::open(&t.dir).unwrap();
    let mut got = Vec::new();
    let report = reader
        .query_report(&q, |s, r| {
            got.push((s, r));
            true
        })
        .unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(report.notes.iter().any(|n| n.contains("rebuilt")), "{:?}", report.notes);
    assert_eq!(seqs(&got), seqs(&want));
    // A record changed in a sealed segment: the report locates it.
    let seg = &segs[2];
    let fr = frame_offsets(seg).unwrap();
    let mut d = fs::read(seg).unwrap();
    d[fr[1].0 as usize + 30] ^= 0x01;
    fs::write(seg, &d).unwrap();
    let reader = LogReader::open(&t.dir).unwrap();
    let report = reader.query_report(&Query::default(), |_, _| true).unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.kind == ProblemKind::Modified && p.file == *seg && p.offset == Some(fr[1].0)),
        "{:?}",
        report.problems
    );
    // A deleted middle segment: every query says so, whatever it reads.
    for ext in ["log", "ckpt", "idx"] {
        let _ = fs::remove_file(segs[4].with_extension(ext));
    }
    let e = LogReader::open(&t.dir).unwrap().query(&q).unwrap_err();
    assert!(
        matches!(e, AuditError::Integrity { .. }) && e.to_string().contains("MissingSegment"),
        "{e}"
    );
}

/// A reader remembers which segments it verified, but an edit with the
/// modification time put back is still seen (the change time moves).
#[test]
fn a_reader_notices_an_edit_made_after_it_checked() {
    let t = Trail::new();
    let segs = t.build(60, 4096, 4);
    let reader = LogReader::open(&t.dir).unwrap();
    let all = Query::default();
    assert_eq!(reader.query(&all).unwrap().len(), 60);
    let seg = &segs[1];
    let mtime = fs::metadata(seg).unwrap().modified().unwrap();
    let fr = frame_offsets(seg).unwrap();
    let mut d = fs::read(seg).unwrap();
    d[fr[0].0 as usize + 40] ^= 0x02;
    fs::write(seg, &d).unwrap();
    let f = fs::File::options().write(true).open(seg).unwrap();
    f.set_times(fs::FileTimes::new().set_modified(mtime)).unwrap();
    drop(f);
    assert_eq!(fs::metadata(seg).unwrap().modified().unwrap(), mtime);
    let e = reader.query(&all).unwrap_err();
    assert!(matches!(e, AuditError::Integrity { .. }), "{e}");
}

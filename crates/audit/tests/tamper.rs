//! Tampering with a log is detected, with the right kind and location;
//! crashes and damage are recovered or refused, never panicking.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use palisade_audit::segment::{frame_offsets, list_segments};
use palisade_audit::{AuditConfig, AuditError, AuditLog, ProblemKind, Query, verify};

fn small() -> AuditConfig {
    AuditConfig {
        segment_bytes: 4096,
        checkpoint_every: 4,
        ..AuditConfig::default()
    }
}

/// A log of 60 records over several segments, closed with a checkpoint.
fn build(dir: &Path) -> Vec<PathBuf> {
    let mut log = AuditLog::open(dir, small()).unwrap();
    for chunk in recs(0, 60).chunks(5) {
        log.append(chunk).unwrap();
    }
    log.checkpoint(T0 + 100 * SEC).unwrap();
    drop(log);
    let segs: Vec<PathBuf> = list_segments(dir).unwrap().into_iter().map(|(_, p)| p).collect();
    assert!(segs.len() >= 5, "want several segments, got {}", segs.len());
    segs
}

fn first_seq(seg: &Path) -> u64 {
    palisade_audit::segment::parse_segment_name(seg.file_name().unwrap().to_str().unwrap()).unwrap()
}

/// One frame's bytes.
fn frame_bytes(data: &[u8], frames: &[(u64, u32)], i: usize) -> Vec<u8> {
    let (off, len) = frames[i];
    data[off as usize..off as usize + 4 + len as usize + 32].to_vec()
}

struct Expect {
    kind: ProblemKind,
    file: PathBuf,
    offset: Option<u64>,
    seq: Option<u64>,
}

type Tamper = fn(&[PathBuf]) -> Expect;

#[test]
fn tampering_is_detected_at_the_right_place() {
    let cases: Vec<(&str, Tamper)> = vec![
        ("flip a payload byte", |segs| {
            let seg = &segs[1];
            let fr = frame_offsets(seg).unwrap();
            let mut d = fs::read(seg).unwrap();
            d[fr[2].0 as usize + 4 + 10] ^= 0x01;
            fs::write(seg, d).unwrap();
            Expect {
                kind: ProblemKind::Modified,
                file: seg.clone(),
                offset: Some(fr[2].0),
                seq: Some(first_seq(seg) + 2),
            }
        }),
        ("flip a hash byte", |segs| {
            let seg = &segs[1];
            let fr = frame_offsets(seg).unwrap();
            let mut d = fs::read(seg).unwrap();
            d[fr[1].0 as usize + 4 + fr[1].1 as usize + 5] ^= 0x80;
            fs::write(seg, d).unwrap();
            Expect {
                kind: ProblemKind::HashModified,
                file: seg.clone(),
                offset: Some(fr[1].0),
                seq: Some(first_seq(seg) + 1),
            }
        }),
        ("delete a record", |segs| {
            let seg = &segs[2];
            let fr = frame_offsets(seg).unwrap();
            let d = fs::read(seg).unwrap();
            let (off, len) = fr[2];
            let mut out = d[..off as usize].to_vec();
            out.extend_from_slice(&d[off as usize + 36 + len as usize..]);
            fs::write(seg, out).unwrap();
            Expect {
                kind: ProblemKind::Deleted,
                file: seg.clone(),
                offset: Some(off),
                seq: Some(first_seq(seg) + 2),
            }
        }),
        ("insert a duplicated record", |segs| {
            let seg = &segs[1];
            let fr = frame_offsets(seg).unwrap();
            let d = fs::read(seg).unwrap();
            let copy = frame_bytes(&d, &fr, 1);
            let at = fr[2].0 as usize;
            let mut out = d[..at].to_vec();
            out.extend_from_slice(&copy);
            out.extend_from_slice(&d[at..]);
            fs::write(seg, out).unwrap();
            Expect {
                kind: ProblemKind::Inserted,
                file: seg.clone(),
                offset: Some(fr[2].0),
                seq: Some(first_seq(seg) + 2),
            }
        }),
        ("swap two records", |segs| {
            let seg = &segs[3];
            let fr = frame_offsets(seg).unwrap();
            let d = fs::read(seg).unwrap();
            let (a, b) = (frame_bytes(&d, &fr, 1), frame_bytes(&d, &fr, 2));
            let start = fr[1].0 as usize;
            let mut out = d[..start].to_vec();
            out.extend_from_slice(&b);
            out.extend_from_slice(&a);
            out.extend_from_slice(&d[start + a.len() + b.len()..]);
            fs::write(seg, out).unwrap();
            Expect {
                kind: ProblemKind::Reordered,
                file: seg.clone(),
                offset: Some(fr[1].0),
                seq: Some(first_seq(seg) + 1),
            }
        }),
        ("truncate mid-record", |segs| {
            let seg = segs.last().unwrap();
            let fr = frame_offsets(seg).unwrap();
            let (off, len) = *fr.last().unwrap();
            let d = fs::read(seg).unwrap();
            fs::write(seg, &d[..off as usize + 4 + len as usize / 2]).unwrap();
            Expect {
                kind: ProblemKind::TornTail,
                file: seg.clone(),
                offset: Some(off),
                seq: Some(first_seq(seg) + fr.len() as u64 - 1),
            }
        }),
        ("delete a middle segment", |segs| {
            let seg = &segs[2];
            for ext in ["log", "ckpt", "idx"] {
                fs::remove_file(seg.with_extension(ext)).unwrap();
            }
            Expect {
                kind: ProblemKind::MissingSegment,
                file: segs[3].clone(),
                offset: Some(0),
                seq: Some(first_seq(seg)),
            }
        }),
        ("modify a checkpoint signature", |segs| {
            let ck = segs[1].with_extension("ckpt");
            let mut d = fs::read(&ck).unwrap();
            assert!(d.len() >= 2 * 112);
            d[112 + 60] ^= 0x04;
            fs::write(&ck, d).unwrap();
            let seq = u64::from_le_bytes(fs::read(&ck).unwrap()[112..120].try_into().unwrap());
            Expect {
                kind: ProblemKind::BadSignature,
                file: ck,
                offset: Some(112),
                seq: Some(seq),
            }
        }),
        ("rewrite a record and recompute the rest of its segment", |segs| {
            // Without the key the attacker can fix hashes but not signatures.
            let seg = &segs[1];
            let fr = frame_offsets(seg).unwrap();
            let d = fs::read(seg).unwrap();
            let hdr = palisade_audit::segment::SegmentHeader::parse(&d).unwrap();
            let mut prev = hdr.prev_hash;
            let mut out = d[..fr[0].0 as usize].to_vec();
            for (i, &(off, len)) in fr.iter().enumerate() {
                let mut payload = d[off as usize + 4..off as usize + 4 + len as usize].to_vec();
                if i == 0 {
                    let p = String::from_utf8(payload)
                        .unwrap()
                        .replace("alice", "mallory")
                        .replace("hv1", "hv9");
                    payload = p.into_bytes();
                }
                let h = palisade_audit::segment::chain_hash(&prev, hdr.first_seq + i as u64, &payload);
                out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
                out.extend_from_slice(&payload);
                out.extend_from_slice(&h);
                prev = h;
            }
            fs::write(seg, out).unwrap();
            Expect {
                kind: ProblemKind::CheckpointMismatch,
                file: seg.with_extension("ckpt"),
                offset: None,
                seq: None,
            }
        }),
        ("delete the first segment", |segs| {
            for ext in ["log", "ckpt", "idx"] {
                fs::remove_file(segs[0].with_extension(ext)).unwrap();
            }
            Expect {
                kind: ProblemKind::UnexplainedStart,
                file: segs[1].clone(),
                offset: Some(0),
                seq: Some(first_seq(&segs[1])),
            }
        }),
    ];
    for (name, tamper) in cases {
        let tmp = TrailDir::new();
        let segs = build(tmp.path());
        let clean = verify(tmp.path(), None).unwrap();
        assert!(clean.is_ok(), "{name}: clean log fails: {:#?}", clean.problems);
        assert_eq!(clean.records, 60);
        let want = tamper(&segs);
        let report = verify(tmp.path(), None).unwrap();
        let found = report.problems.iter().find(|p| {
            p.kind == want.kind
                && p.file == want.file
                && (want.offset.is_none() || p.offset == want.offset)
                && (want.seq.is_none() || p.seq == want.seq)
        });
        assert!(
            found.is_some(),
            "{name}: want {:?} in {} at {:?} seq {:?}; got:\n{}",
            want.kind,
            want.file.display(),
            want.offset,
            want.seq,
            report.problems.iter().map(|p| format!("  {p}\n")).collect::<String>()
        );
        // The first problem reported is the edit itself, not a consequence of it.
        assert_eq!(report.problems[0].kind, want.kind, "{name}: {:#?}", report.problems);
    }
}

#[test]
fn a_clean_log_verifies_and_reopens() {
    let tmp = TrailDir::new();
    build(tmp.path());
    let mut log = AuditLog::open(tmp.path(), small()).unwrap();
    assert!(log.recovery().is_clean(), "{:?}", log.recovery());
    assert_eq!(log.last_seq(), 60);
    assert_eq!(log.append(&recs(60, 63)).unwrap(), 63);
    drop(log);
    let r = verify(tmp.path(), None).unwrap();
    assert!(r.is_ok(), "{:#?}", r.problems);
    assert_eq!((r.first_seq, r.last_seq, r.records), (1, 63, 63));
    // Signed at least through the checkpoint taken before reopening.
    assert!(r.signed_through >= 60, "{r:?}");
}

#[test]
fn wrong_public_key_is_reported() {
    let tmp = TrailDir::new();
    build(tmp.path());
    let other = TrailDir::new();
    AuditLog::open(other.path(), AuditConfig::default()).unwrap();
    let r = verify(tmp.path(), Some(&other.path().join("audit.pub"))).unwrap();
    assert_eq!(r.problems[0].kind, ProblemKind::BadSignature);
    assert!(r.problems[0].detail.contains("wrong key"), "{}", r.problems[0]);
    // A malformed key file is an error, not a panic.
    fs::write(other.path().join("bad.pub"), "not hex").unwrap();
    let e = verify(tmp.path(), Some(&other.path().join("bad.pub"))).unwrap_err();
    assert!(matches!(e, AuditError::Key { .. }), "{e}");
}

#[test]
fn open_sets_a_torn_tail_aside_and_reports_it() {
    let tmp = TrailDir::new();
    let segs = build(tmp.path());
    let last = segs.last().unwrap();
    let before = fs::read(last).unwrap();
    // A crash mid-append: a frame header promising more bytes than were written.
    let mut torn = before.clone();
    torn.extend_from_slice(&500u32.to_le_bytes());
    torn.extend_from_slice(b"{\"kind\":\"flow\"");
    fs::write(last, &torn).unwrap();
    let r = verify(tmp.path(), None).unwrap();
    assert!(r.only_torn_tail() && !r.is_ok(), "{:#?}", r.problems);
    let mut log = AuditLog::open(tmp.path(), small()).unwrap();
    let rec = &log.recovery().torn;
    assert_eq!(rec.len(), 1, "{:?}", log.recovery());
    assert_eq!(rec[0].file, *last);
    assert_eq!(rec[0].offset, before.len() as u64);
    assert_eq!(rec[0].last_intact_seq, 60);
    assert_eq!(fs::read(&rec[0].moved_to).unwrap(), &torn[before.len()..]);
    assert_eq!(fs::read(last).unwrap(), before);
    assert_eq!(log.append(&recs(60, 61)).unwrap(), 61);
    drop(log);
    let after = verify(tmp.path(), None).unwrap();
    assert!(after.is_ok(), "{:#?}", after.problems);
    assert!(after.notes.iter().any(|n| n.contains(".torn")), "{:?}", after.notes);
}

/// A whole last frame whose hash does not match is not a torn write (a
/// crash leaves an incomplete frame, never a whole one with a wrong hash):
/// like damage before it, it is refused with its location and kept. This
/// test used to assert that such a frame was set aside as torn, which is how
/// a restart erased a signed record (issue 22, item 7).
#[test]
fn a_whole_last_frame_with_a_bad_hash_is_refused_like_damage_before_it() {
    for signed in [true, false] {
        let tmp = TrailDir::new();
        let segs = build(tmp.path());
        if !signed {
            // One more record after the last checkpoint: unsigned.
            let cfg = AuditConfig {
                checkpoint_every: 1000,
                checkpoint_interval: std::time::Duration::from_secs(3600),
                ..small()
            };
            let mut log = AuditLog::open(tmp.path(), cfg).unwrap();
            log.append(&recs(60, 61)).unwrap();
        }
        let last = list_segments(tmp.path()).unwrap().pop().unwrap().1;
        let fr = frame_offsets(&last).unwrap();
        let original = fs::read(&last).unwrap();
        let mut d = original.clone();
        let n = d.len();
        d[n - 1] ^= 1;
        fs::write(&last, &d).unwrap();
        match AuditLog::open(tmp.path(), small()) {
            Err(AuditError::Corrupt { path, offset, .. }) => {
                assert_eq!((&path, offset), (&last, fr.last().unwrap().0), "signed: {signed}");
            }
            other => panic!("signed: {signed}: want Corrupt, got {other:?}"),
        }
        assert_eq!(fs::read(&last).unwrap(), d, "signed: {signed}: the segment was changed");
        let _ = segs;
    }

    let tmp = TrailDir::new();
    let segs = build(tmp.path());
    let last = segs.last().unwrap().clone();
    let fr = frame_offsets(&last).unwrap();
    let mut d = fs::read(&last).unwrap();
    d[fr[0].0 as usize + 20] ^= 1;
    fs::write(&last, &d).unwrap();
    match AuditLog::open(tmp.path(), small()) {
        Err(AuditError::Corrupt { path, offset, .. }) => {
            assert_eq!((path, offset), (last, fr[0].0));
        }
        other => panic!("want Corrupt, got {other:?}"),
    }
}

#[test]
fn garbage_files_and_damaged_indexes_do_not_panic() {
    let tmp = TrailDir::new();
    build(tmp.path());
    let all = Query::default();
    let want = AuditLog::open(tmp.path(), small()).unwrap().query(&all).unwrap();
    assert_eq!(want.len(), 60);
    // Damaged derived data is rebuilt.
    fs::write(tmp.path().join("index.json"), "{garbage").unwrap();
    for (_, p) in list_segments(tmp.path()).unwrap() {
        if p.with_extension("idx").exists() {
            fs::write(p.with_extension("idx"), b"PALAUDI1 not an index").unwrap();
        }
    }
    let log = AuditLog::open(tmp.path(), small()).unwrap();
    assert!(
        log.recovery().notes.iter().any(|n| n.contains("index")),
        "{:?}",
        log.recovery()
    );
    assert_eq!(log.query(&all).unwrap(), want);
    drop(log);
    assert_eq!(
        palisade_audit::LogReader::open(tmp.path())
            .unwrap()
            .query(&all)
            .unwrap(),
        want
    );
    // A garbage segment is reported by verify and refused by open.
    let junk = tmp.path().join(palisade_audit::segment::segment_name(1000));
    fs::write(&junk, vec![0xa5; 300]).unwrap();
    let r = verify(tmp.path(), None).unwrap();
    assert!(
        r.problems
            .iter()
            .any(|p| p.kind == ProblemKind::BadHeader && p.file == junk),
        "{:#?}",
        r.problems
    );
    assert!(AuditLog::open(tmp.path(), small()).is_err());
    // A key that does not match audit.pub is refused (inside the trail, or outside it).
    let keyfile = tmp.path().join("other.key");
    fs::write(&keyfile, format!("{}\n", "11".repeat(32))).unwrap();
    let cfg = AuditConfig {
        key_file: Some(keyfile),
        ..small()
    };
    assert!(matches!(AuditLog::open(tmp.path(), cfg), Err(AuditError::Key { .. })));
    let outside = tmp.path().with_file_name("other.key");
    fs::write(&outside, format!("{}\n", "11".repeat(32))).unwrap();
    fs::set_permissions(&outside, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let cfg = AuditConfig {
        key_file: Some(outside),
        ..small()
    };
    match AuditLog::open(tmp.path(), cfg) {
        Err(AuditError::Key { path, reason }) => {
            assert!(
                path.ends_with("audit.pub") && reason.contains("does not match"),
                "{path:?}: {reason}"
            );
        }
        other => panic!("want a key mismatch, got {other:?}"),
    }
    // An empty directory is no log.
    let empty = TrailDir::new();
    assert!(palisade_audit::LogReader::open(empty.path()).is_err());
}

#[test]
fn key_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = TrailDir::new();
    AuditLog::open(tmp.path(), AuditConfig::default()).unwrap();
    // The key is created beside the trail directory, not in it.
    assert!(!tmp.path().join("audit.key").exists());
    let key = tmp.path().with_extension("key");
    let mode = fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

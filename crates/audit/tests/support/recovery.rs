//! The audit-recovery property, shared by the fuzz target `audit_recovery`
//! (which includes this file) and the test that replays its committed inputs.
//!
//! An input drives: a trail built by the real writer (segment size,
//! checkpoint spacing, batches; an older copy of the directory taken on the
//! way; a crash mid-append left as an incomplete last frame), then damage to
//! it (byte flips, truncations, zeroed ranges, inserted or appended bytes,
//! deleted, duplicated or swapped files, a consistent cut of the tail, the
//! older copy put back), then recovery (open, with or without the head
//! publisher, and one append), then `verify` with the public key pinned,
//! without and with the last published head. It checks:
//!
//! - no acknowledged record is lost by recovery: every acknowledged frame
//!   the damage left intact is still at its place after recovery, and every
//!   whole checkpoint entry too;
//! - no tampering is reported as intact: when verify says intact, the trail's
//!   records are the acknowledged ones from seq 1 on, then only records
//!   appended after recovery (a suffix may be missing: a cut tail or an older
//!   copy cannot be seen without an external head); with the published head
//!   given, that prefix reaches at least the head;
//! - an undamaged trail recovers and verifies intact, with every record.
//!
//! Nothing may panic. Trails live in `/dev/shm` when it exists (fsync there
//! costs nothing, so a run is fast).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use palisade_audit::checkpoint::{CHECKPOINT_LEN, Checkpoint, read_signing_key};
use palisade_audit::record::{ChangeRecord, Record};
use palisade_audit::segment::{FrameScanner, Scan, list_segments, parse_segment_name, segment_name};
use palisade_audit::{AuditConfig, AuditLog, SignedHead, VerifyOptions, verify_with};

const T0: u64 = 1_700_000_000_000_000_000;
const SEC: u64 = 1_000_000_000;
/// The actor of records appended after recovery.
const AFTER: &str = "after-recovery";

/// Reads the input as numbers, zeros once it is used up.
struct Input<'a> {
    data: &'a [u8],
    at: usize,
}

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { self.u32() as usize % n }
    }
}

fn record(i: u64, actor: &str, pad: u8) -> Record {
    Record::Change(ChangeRecord {
        time_ns: T0 + i * SEC,
        actor: actor.into(),
        action: "vm.tag".into(),
        resource: format!("vm/vm-{}", i % 5),
        diff: format!("{}{i}", "x".repeat(usize::from(pad % 48))),
        policy_version: Some(i),
    })
}

/// Every file of `dir` by name, with its bytes.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if let (Ok(name), Ok(bytes)) = (e.file_name().into_string(), std::fs::read(e.path())) {
                out.insert(name, bytes);
            }
        }
    }
    out
}

fn copy_dir(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::create_dir_all(to).map_err(|e| e.to_string())?;
    for (name, bytes) in files(from) {
        std::fs::write(to.join(name), bytes).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The payloads of a trail's whole frames, segment by segment in name order
/// (what a reader sees; verify saying intact makes this the chain's order).
fn payloads(dir: &Path) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (_, p) in list_segments(dir).unwrap_or_default() {
        let Ok((_, mut s)) = FrameScanner::open(&p) else {
            continue;
        };
        while let Ok(Scan::Frame { .. }) = s.next_frame() {
            out.push(s.payload.clone());
        }
    }
    out
}

/// Where each acknowledged record's frame is: segment file name, offset, bytes.
fn frame_places(dir: &Path) -> Vec<(String, u64, Vec<u8>)> {
    let mut out = Vec::new();
    for (_, p) in list_segments(dir).unwrap_or_default() {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let Ok(bytes) = std::fs::read(&p) else { continue };
        let Ok((_, mut s)) = FrameScanner::open(&p) else {
            continue;
        };
        while let Ok(Scan::Frame { offset }) = s.next_frame() {
            let end = offset as usize + s.payload.len() + 36;
            out.push((name.clone(), offset, bytes[offset as usize..end].to_vec()));
        }
    }
    out
}

/// How many of the trail's records are the acknowledged ones from seq 1 on;
/// an error if anything after them is not a record appended after recovery.
fn prefix_then_after(trail: &[Vec<u8>], acked: &[Vec<u8>]) -> Result<usize, String> {
    let k = trail.iter().zip(acked).take_while(|(a, b)| a == b).count();
    for (i, p) in trail.iter().enumerate().skip(k) {
        let after =
            serde_json::from_slice::<Record>(p).is_ok_and(|r| matches!(r, Record::Change(c) if c.actor == AFTER));
        if !after {
            return Err(format!(
                "seq {} is neither the acknowledged record nor one appended after recovery: {}",
                i + 1,
                String::from_utf8_lossy(p)
            ));
        }
    }
    Ok(k)
}

/// Apply one damage operation read from `inp`.
fn damage(inp: &mut Input<'_>, dir: &Path, older: Option<&Path>) -> Result<(), String> {
    let names: Vec<String> = files(dir).into_keys().collect();
    let pick = |inp: &mut Input<'_>| names.get(inp.below(names.len())).map(|n| dir.join(n));
    let segs: Vec<(u64, PathBuf)> = list_segments(dir).unwrap_or_default();
    let io = |e: std::io::Error| e.to_string();
    match inp.u8() % 10 {
        0 => {
            // Flip bits of one byte.
            if let Some(p) = pick(inp) {
                let mut d = std::fs::read(&p).map_err(io)?;
                if !d.is_empty() {
                    let at = inp.below(d.len());
                    d[at] ^= inp.u8();
                    std::fs::write(&p, d).map_err(io)?;
                }
            }
        }
        1 => {
            // Truncate.
            if let Some(p) = pick(inp) {
                let d = std::fs::read(&p).map_err(io)?;
                let len = inp.below(d.len() + 1);
                std::fs::write(&p, &d[..len]).map_err(io)?;
            }
        }
        2 => {
            // Zero a range.
            if let Some(p) = pick(inp) {
                let mut d = std::fs::read(&p).map_err(io)?;
                if !d.is_empty() {
                    let at = inp.below(d.len());
                    let n = 1 + usize::from(inp.u16() % 512);
                    let end = (at + n).min(d.len());
                    d[at..end].fill(0);
                    std::fs::write(&p, d).map_err(io)?;
                }
            }
        }
        3 => {
            // Delete a file.
            if let Some(p) = pick(inp) {
                std::fs::remove_file(&p).map_err(io)?;
            }
        }
        4 => {
            // Duplicate a segment (and maybe its checkpoints) under another first seq.
            if let Some((first, p)) = segs.get(inp.below(segs.len())) {
                let to = dir.join(segment_name(first + 1 + u64::from(inp.u8())));
                std::fs::copy(p, &to).map_err(io)?;
                if inp.u8() & 1 == 1 {
                    let _ = std::fs::copy(p.with_extension("ckpt"), to.with_extension("ckpt"));
                }
            }
        }
        5 => {
            // Swap two segments' contents (reordered files).
            let (a, b) = (inp.below(segs.len()), inp.below(segs.len()));
            if a != b && !segs.is_empty() {
                let (pa, pb) = (&segs[a].1, &segs[b].1);
                let (da, db) = (std::fs::read(pa).map_err(io)?, std::fs::read(pb).map_err(io)?);
                std::fs::write(pa, db).map_err(io)?;
                std::fs::write(pb, da).map_err(io)?;
            }
        }
        6 => {
            // Put the older copy of the whole directory back.
            if let Some(older) = older {
                for n in &names {
                    std::fs::remove_file(dir.join(n)).map_err(io)?;
                }
                copy_dir(older, dir)?;
            }
        }
        7 => {
            // Append bytes.
            if let Some(p) = pick(inp) {
                let mut d = std::fs::read(&p).map_err(io)?;
                let n = 1 + usize::from(inp.u8() % 64);
                for _ in 0..n {
                    d.push(inp.u8());
                }
                std::fs::write(&p, d).map_err(io)?;
            }
        }
        8 => {
            // Insert bytes in the middle.
            if let Some(p) = pick(inp) {
                let mut d = std::fs::read(&p).map_err(io)?;
                let at = inp.below(d.len() + 1);
                let n = 1 + usize::from(inp.u8() % 64);
                let ins: Vec<u8> = (0..n).map(|_| inp.u8()).collect();
                d.splice(at..at, ins);
                std::fs::write(&p, d).map_err(io)?;
            }
        }
        _ => {
            // Cut the tail consistently after some record: later segments
            // and their sidecars deleted, the segment cut after its frame,
            // its checkpoints after it dropped (what a cut looks like when
            // done with care).
            let total: usize = segs.iter().map(|(_, p)| frame_count(p)).sum();
            if total == 0 {
                return Ok(());
            }
            let keep = 1 + inp.below(total) as u64;
            for (first, p) in &segs {
                let n = frame_count(p) as u64;
                if *first > keep {
                    for ext in ["log", "ckpt", "idx"] {
                        let _ = std::fs::remove_file(p.with_extension(ext));
                    }
                } else if keep < first + n {
                    let Ok((_, mut s)) = FrameScanner::open(p) else {
                        continue;
                    };
                    let mut end = 0;
                    for _ in 0..=(keep - first) {
                        if let Ok(Scan::Frame { .. }) = s.next_frame() {
                            end = s.position();
                        }
                    }
                    let d = std::fs::read(p).map_err(io)?;
                    std::fs::write(p, &d[..end as usize]).map_err(io)?;
                    let ck = p.with_extension("ckpt");
                    if let Ok(c) = std::fs::read(&ck) {
                        let kept: Vec<u8> = c
                            .chunks_exact(CHECKPOINT_LEN)
                            .filter(|e| Checkpoint::parse(e).is_some_and(|c| c.seq <= keep))
                            .flatten()
                            .copied()
                            .collect();
                        std::fs::write(&ck, kept).map_err(io)?;
                    }
                    let _ = std::fs::remove_file(p.with_extension("idx"));
                }
            }
            let _ = std::fs::remove_file(dir.join("index.json"));
        }
    }
    Ok(())
}

fn frame_count(p: &Path) -> usize {
    let Ok((_, mut s)) = FrameScanner::open(p) else {
        return 0;
    };
    let mut n = 0;
    while let Ok(Scan::Frame { .. }) = s.next_frame() {
        n += 1;
    }
    n
}

/// Run the property on one input.
pub fn check(data: &[u8]) -> Result<(), String> {
    let mut inp = Input { data, at: 0 };
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .map_err(|e| e.to_string())?;
    let dir = base.path().join("trail");
    let key = base.path().join("audit.key");
    let head = base.path().join("audit.head");
    let older_dir = base.path().join("older");
    let config = AuditConfig {
        segment_bytes: 600 + u64::from(inp.u16() % 6000),
        checkpoint_every: 1 + u64::from(inp.u8() % 16),
        checkpoint_interval: if inp.u8() & 1 == 0 {
            Duration::from_secs(3600)
        } else {
            Duration::from_secs(2)
        },
        key_file: Some(key.clone()),
        head_file: Some(head.clone()),
        ..AuditConfig::default()
    };

    // A trail built by the real writer.
    let batches = 1 + usize::from(inp.u8() % 24);
    let older_after = inp.below(batches + 1);
    let mut acked: Vec<Vec<u8>> = Vec::new();
    let mut log = AuditLog::open(&dir, config.clone()).map_err(|e| format!("open a new trail: {e}"))?;
    let mut older = None;
    for b in 0..batches {
        let n = 1 + inp.u8() % 6;
        let recs: Vec<Record> = (0..n)
            .map(|_| record(acked.len() as u64 + 1, "writer", inp.u8()))
            .collect();
        let seq = log.append(&recs).map_err(|e| format!("append: {e}"))?;
        acked.extend(recs.iter().map(|r| serde_json::to_vec(r).unwrap_or_default()));
        if seq != acked.len() as u64 {
            return Err(format!("append acknowledged seq {seq}, want {}", acked.len()));
        }
        if b + 1 == older_after {
            copy_dir(&dir, &older_dir)?;
            older = Some(older_dir.as_path());
        }
    }
    if inp.u8() & 1 == 1 {
        log.checkpoint(T0 + 10_000 * SEC)
            .map_err(|e| format!("checkpoint: {e}"))?;
    }
    drop(log);
    let vk = read_signing_key(&key).map_err(|e| e.to_string())?.verifying_key();
    let published = SignedHead::read(&head).map_err(|e| e.to_string())?;
    let places = frame_places(&dir);
    if places.len() != acked.len() {
        return Err(format!(
            "{} frames for {} acknowledged records",
            places.len(),
            acked.len()
        ));
    }

    // A crash mid-append: part of an unacknowledged frame at the end.
    if inp.u8() & 1 == 1
        && let Some((_, last)) = list_segments(&dir).map_err(|e| e.to_string())?.pop()
    {
        let next = serde_json::to_vec(&record(acked.len() as u64 + 1, "writer", 7)).unwrap_or_default();
        let mut frame = (next.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(&next);
        frame.extend_from_slice(&[0xee; 32]);
        let cut = 1 + inp.below(frame.len() - 1);
        let mut d = std::fs::read(&last).map_err(|e| e.to_string())?;
        d.extend_from_slice(&frame[..cut]);
        std::fs::write(&last, d).map_err(|e| e.to_string())?;
    }

    // Damage.
    let undamaged = files(&dir);
    let ops = inp.u8() % 5;
    for _ in 0..ops {
        damage(&mut inp, &dir, older)?;
    }
    let damaged = files(&dir);
    let changed = damaged != undamaged;
    let intact: Vec<&(String, u64, Vec<u8>)> = places
        .iter()
        .filter(|(name, off, bytes)| {
            damaged
                .get(name)
                .and_then(|d| d.get(*off as usize..*off as usize + bytes.len()))
                == Some(bytes.as_slice())
        })
        .collect();

    // Recovery: open (with or without the head publisher) and append.
    let with_publisher = inp.u8() & 1 == 0;
    let recovery_config = AuditConfig {
        head_file: with_publisher.then(|| head.clone()),
        ..config.clone()
    };
    let opened = match AuditLog::open(&dir, recovery_config) {
        Ok(mut log) => {
            let after = record(acked.len() as u64 + 1, AFTER, 1);
            match log.append(&[after]).and_then(|_| log.checkpoint(T0 + 20_000 * SEC)) {
                Ok(()) => Ok(()),
                Err(e) => Err(format!("append after recovery: {e}")),
            }
        }
        Err(e) => Err(e.to_string()),
    };
    let recovered = files(&dir);

    // No acknowledged record lost by recovery, nor a whole checkpoint entry.
    for (name, off, bytes) in &intact {
        let still = recovered
            .get(name)
            .and_then(|d| d.get(*off as usize..*off as usize + bytes.len()));
        if still != Some(bytes.as_slice()) {
            return Err(format!(
                "recovery ({opened:?}) lost the acknowledged frame at {name} byte {off}, intact after the damage"
            ));
        }
    }
    for (name, d) in &damaged {
        if name.ends_with(".ckpt") {
            let whole = d.len() / CHECKPOINT_LEN * CHECKPOINT_LEN;
            let kept = recovered.get(name).and_then(|r| r.get(..whole)) == Some(&d[..whole]);
            // A checkpoint file in a new segment's way is kept aside, whole.
            let aside = recovered
                .iter()
                .any(|(n, r)| n.starts_with(&format!("{name}.orphan")) && r == d);
            if !kept && !aside {
                return Err(format!(
                    "recovery ({opened:?}) changed whole checkpoint entries of {name}"
                ));
            }
        }
    }
    if changed {
        // A file the damage left alone that recovery removed or shortened, other than by
        // setting aside a torn tail, would be caught above for segments; say which.
        for (name, d) in &damaged {
            if parse_segment_name(name).is_some() && !recovered.contains_key(name) {
                return Err(format!("recovery ({opened:?}) removed {name} ({} bytes)", d.len()));
            }
        }
    }

    // No tampering reported as intact, without and with the published head.
    let trail = payloads(&dir);
    let pinned = Some((vk, "pinned key".to_string()));
    let plain = verify_with(
        &dir,
        &VerifyOptions {
            key: pinned.clone(),
            expect_head: None,
        },
    );
    if let Ok(r) = &plain
        && r.is_ok()
    {
        prefix_then_after(&trail, &acked).map_err(|e| format!("verify says intact, but {e} ({opened:?})"))?;
    }
    if let Some(h) = published {
        let headed = verify_with(
            &dir,
            &VerifyOptions {
                key: pinned,
                expect_head: Some((h, "published head".into())),
            },
        );
        if let Ok(r) = &headed
            && r.is_ok()
        {
            let k = prefix_then_after(&trail, &acked)
                .map_err(|e| format!("verify with the head says intact, but {e} ({opened:?})"))?;
            if (k as u64) < h.seq {
                return Err(format!(
                    "verify with the head (seq {}) says intact but only seq 1..={k} are the acknowledged records ({opened:?})",
                    h.seq
                ));
            }
        }
        if !changed && !headed.as_ref().is_ok_and(|r| r.is_ok()) {
            return Err(format!(
                "an undamaged trail fails verify with its head: {headed:?} ({opened:?})"
            ));
        }
    }
    if !changed {
        opened.map_err(|e| format!("an undamaged trail does not recover: {e}"))?;
        match &plain {
            Ok(r) if r.is_ok() => {}
            other => return Err(format!("an undamaged trail fails verify after recovery: {other:?}")),
        }
        let k = prefix_then_after(&trail, &acked)?;
        if k != acked.len() {
            return Err(format!("an undamaged trail lost records: {k} of {}", acked.len()));
        }
    }
    Ok(())
}

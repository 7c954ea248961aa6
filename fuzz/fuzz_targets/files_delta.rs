//! Fuzz the policy-version delta: for any two texts, the edits between them
//! rebuild the second from the first; and any edits a hostile or confused
//! controller could send, applied to any held text, give the new files or an
//! error, never a panic.
#![no_main]

use palisade_api::delta::{Edit, FilesDelta};
use palisade_api::Files;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // Two texts from one input: split at the first NUL.
    let (old, new) = text.split_once('\0').unwrap_or((&text, ""));
    let held: Files = [("a.yaml".to_string(), old.to_string())].into();
    let wanted: Files = [("a.yaml".to_string(), new.to_string())].into();
    let delta = FilesDelta::between(1, &held, &wanted);
    assert_eq!(delta.apply(&held).as_ref(), Ok(&wanted));

    // The same bytes as edits: each byte an operation.
    let edits: Vec<Edit> = data
        .iter()
        .map(|&b| match b % 3 {
            0 => Edit::Copy(usize::from(b / 3)),
            1 => Edit::Skip(usize::from(b / 3)),
            _ => Edit::Insert("x\n".repeat(usize::from(b / 3))),
        })
        .collect();
    let hostile = FilesDelta {
        base: 1,
        changed: [("a.yaml".to_string(), edits)].into(),
        removed: vec!["b.yaml".to_string()],
        digest: delta.digest.clone(),
    };
    let _ = hostile.apply(&held);
});

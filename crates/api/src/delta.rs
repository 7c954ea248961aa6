//! A new policy version as edits of one the agent already holds.
//!
//! At 50,000 VMs a version's files are about 10 MB, nearly all of it the
//! inventory, and most new versions change a few lines of it (a VM added, a
//! rule edited). An agent says which version it holds (`have=VERSION`); when
//! that is not the current one, the controller sends a [`FilesDelta`]: for
//! each changed file a line diff of the held text, as copy / skip / insert
//! operations, and a SHA-256 digest of the files the result must be. The
//! agent applies it to what it holds ([`FilesDelta::apply`]); a result that
//! does not match the digest (a held file altered on disk, a controller bug)
//! is an error, and the agent then asks for the whole bundle. Correctness
//! never depends on the diff being minimal: any operations that rebuild the
//! files are right, which is why the diff may be cut short by a deadline.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::sources::Files;

/// How long one file's diff may search for a short edit script before it
/// settles for a longer one (still correct, only bigger).
const DIFF_DEADLINE: Duration = Duration::from_millis(500);

/// One step of rebuilding a file from the held text, line by line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Edit {
    /// Take the next `n` lines of the held text as they are.
    Copy(usize),
    /// Drop the next `n` lines of the held text.
    Skip(usize),
    /// Insert this text (whole lines, with their line ends).
    Insert(String),
}

/// The files of version `version` as edits of those of version `base`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilesDelta {
    /// The version whose files the edits apply to.
    pub base: u64,
    /// Each file that is new or changed, as edits of the held file (of an
    /// empty text for a new one). Files not named are unchanged.
    pub changed: BTreeMap<String, Vec<Edit>>,
    /// Files the new version no longer has.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
    /// [`digest`] of the files the edits produce.
    pub digest: String,
}

/// Applying a [`FilesDelta`] failed: the held files are not the ones it was made from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("delta from version {base}: {problem}")]
pub struct DeltaError {
    /// The base version the delta names.
    pub base: u64,
    /// What did not fit.
    pub problem: String,
}

/// SHA-256 over every file's name and text, each length-prefixed, in name
/// order: equal exactly when the file sets are equal.
pub fn digest(files: &Files) -> String {
    let mut h = Sha256::new();
    for (name, text) in files {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((text.len() as u64).to_le_bytes());
        h.update(text.as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

impl FilesDelta {
    /// The edits that turn `old` (the files of version `base`) into `new`.
    pub fn between(base: u64, old: &Files, new: &Files) -> FilesDelta {
        let changed = new
            .iter()
            .filter(|(name, text)| old.get(*name) != Some(*text))
            .map(|(name, text)| {
                let held = old.get(name).map_or("", String::as_str);
                (name.clone(), edits(held, text))
            })
            .collect();
        FilesDelta {
            base,
            changed,
            removed: old.keys().filter(|n| !new.contains_key(*n)).cloned().collect(),
            digest: digest(new),
        }
    }

    /// The new files, from `held` (the files of version [`FilesDelta::base`]).
    pub fn apply(&self, held: &Files) -> Result<Files, DeltaError> {
        let fail = |problem: String| DeltaError {
            base: self.base,
            problem,
        };
        let mut files = held.clone();
        for name in &self.removed {
            files.remove(name);
        }
        for (name, edits) in &self.changed {
            let old = held.get(name).map_or("", String::as_str);
            let text = rebuild(old, edits).map_err(|p| fail(format!("file {name}: {p}")))?;
            files.insert(name.clone(), text);
        }
        let got = digest(&files);
        if got != self.digest {
            return Err(fail(format!(
                "the result's digest is {got}, the delta says {}",
                self.digest
            )));
        }
        Ok(files)
    }
}

/// A line diff of `old` to `new` as edits. Lines end at `\n` only, here
/// and in [`rebuild`]: both ends must cut the text the same way.
fn edits(old: &str, new: &str) -> Vec<Edit> {
    use similar::DiffOp;
    let old_lines: Vec<&str> = old.split_inclusive('\n').collect();
    let new_lines: Vec<&str> = new.split_inclusive('\n').collect();
    let ops = similar::capture_diff_slices_deadline(
        similar::Algorithm::Myers,
        &old_lines,
        &new_lines,
        Some(std::time::Instant::now() + DIFF_DEADLINE),
    );
    let insert = |at: usize, len: usize| Edit::Insert(new_lines[at..at + len].concat());
    let mut out: Vec<Edit> = Vec::new();
    for op in ops {
        match op {
            DiffOp::Equal { len, .. } => out.push(Edit::Copy(len)),
            DiffOp::Delete { old_len, .. } => out.push(Edit::Skip(old_len)),
            DiffOp::Insert { new_index, new_len, .. } => out.push(insert(new_index, new_len)),
            DiffOp::Replace {
                old_len,
                new_index,
                new_len,
                ..
            } => {
                out.push(Edit::Skip(old_len));
                out.push(insert(new_index, new_len));
            }
        }
    }
    out
}

/// Follow `edits` over the lines of `old`; every held line must be consumed.
fn rebuild(old: &str, edits: &[Edit]) -> Result<String, String> {
    let mut lines = old.split_inclusive('\n');
    let mut out = String::with_capacity(old.len());
    for (i, e) in edits.iter().enumerate() {
        match e {
            Edit::Copy(n) | Edit::Skip(n) => {
                for k in 0..*n {
                    let line = lines
                        .next()
                        .ok_or_else(|| format!("edit {i} goes {} lines past the end of the held text", n - k))?;
                    if matches!(e, Edit::Copy(_)) {
                        out.push_str(line);
                    }
                }
            }
            Edit::Insert(text) => out.push_str(text),
        }
    }
    match lines.count() {
        0 => Ok(out),
        left => Err(format!("{left} held lines are left over after the last edit")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(pairs: &[(&str, &str)]) -> Files {
        pairs.iter().map(|(n, t)| (n.to_string(), t.to_string())).collect()
    }

    #[test]
    fn deltas_rebuild_the_new_files() {
        let base = files(&[
            ("inventory.yaml", "a\nb\nc\nd\n"),
            ("policy.yaml", "x\ny"),
            ("gone.yaml", "z\n"),
        ]);
        // (what, new files)
        let cases: &[(&str, Files)] = &[
            ("unchanged", base.clone()),
            (
                "line added",
                files(&[
                    ("inventory.yaml", "a\nb\nB\nc\nd\n"),
                    ("policy.yaml", "x\ny"),
                    ("gone.yaml", "z\n"),
                ]),
            ),
            (
                "line replaced, no final newline",
                files(&[
                    ("inventory.yaml", "a\nb\nc\nd\n"),
                    ("policy.yaml", "x\nY"),
                    ("gone.yaml", "z\n"),
                ]),
            ),
            (
                "file removed and added",
                files(&[
                    ("inventory.yaml", "a\nb\nc\nd\n"),
                    ("policy.yaml", "x\ny"),
                    ("new.yaml", "n\n"),
                ]),
            ),
            ("all emptied", files(&[("inventory.yaml", ""), ("policy.yaml", "")])),
            ("nothing", Files::new()),
            (
                "crlf and unicode",
                files(&[("inventory.yaml", "a\r\nβ\r\nc\n"), ("policy.yaml", "x\ny\n")]),
            ),
            // Found by fuzzing: a lone CR, which a line splitter that also
            // ends lines at CR would cut differently from the rebuild.
            (
                "lone carriage return",
                files(&[("inventory.yaml", "\r\u{fffd}\u{fffd}"), ("policy.yaml", "")]),
            ),
        ];
        for (what, new) in cases {
            let d = FilesDelta::between(7, &base, new);
            assert_eq!(d.apply(&base).as_ref(), Ok(new), "{what}");
            // Unchanged files are not sent.
            for (name, text) in new {
                assert_eq!(
                    d.changed.contains_key(name),
                    base.get(name) != Some(text),
                    "{what}: {name}"
                );
            }
            // It survives the wire.
            let wire: FilesDelta = serde_json::from_slice(&serde_json::to_vec(&d).unwrap()).unwrap();
            assert_eq!(wire, d, "{what}");
        }
    }

    #[test]
    fn a_one_line_change_in_a_large_file_is_small() {
        let inventory: String = (0..50_000)
            .map(|i| format!("  - {{ name: vm{i}, host: hv{} }}\n", i % 1000))
            .collect();
        let base = files(&[("inventory.yaml", &inventory)]);
        let mut grown = inventory.clone();
        grown.insert_str(inventory.len() / 2, "  - { name: extra, host: hv1 }\n");
        let new = files(&[("inventory.yaml", &grown)]);
        let d = FilesDelta::between(1, &base, &new);
        let size = serde_json::to_vec(&d).unwrap().len();
        assert!(
            size < 500,
            "{size} bytes for a one-line change of a {} byte file",
            inventory.len()
        );
        assert_eq!(d.apply(&base).unwrap(), new);
    }

    #[test]
    fn a_delta_on_other_files_is_refused() {
        let base = files(&[("inventory.yaml", "a\nb\n")]);
        let new = files(&[("inventory.yaml", "a\nc\n")]);
        let d = FilesDelta::between(3, &base, &new);
        // (what, held files, expected problem)
        let cases = [
            ("a line more", files(&[("inventory.yaml", "a\nb\nx\n")]), "left over"),
            ("a line less", files(&[("inventory.yaml", "a\n")]), "past the end"),
            ("a line altered", files(&[("inventory.yaml", "A\nb\n")]), "digest"),
            (
                "another file",
                files(&[("inventory.yaml", "a\nb\n"), ("x.yaml", "")]),
                "digest",
            ),
        ];
        for (what, held, problem) in cases {
            let err = d.apply(&held).unwrap_err();
            assert!(err.to_string().contains(problem), "{what}: {err}");
            assert!(err.to_string().contains("version 3"), "{what}: {err}");
        }
    }
}

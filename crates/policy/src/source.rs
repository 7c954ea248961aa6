//! Where policy text comes from: a directory of YAML files, or memory.
//!
//! The loader only sees a [`PolicySource`], so tests feed files from memory and
//! the CLI reads a directory; both give the loader `(name, text)` pairs in a
//! stable order (sorted by name), which fixes the order of rules that several
//! files contribute to the same level.

use std::fs;
use std::path::{Path, PathBuf};

/// Reading a policy source failed (the only I/O this crate does).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A file or directory could not be read.
    #[error("cannot read {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The source holds no YAML file.
    #[error("no .yaml or .yml file in {0}")]
    Empty(PathBuf),
}

/// A provider of policy files.
pub trait PolicySource {
    /// The files, as (display name, contents), in load order.
    fn files(&self) -> Result<Vec<(PathBuf, String)>, SourceError>;
}

/// Every `*.yaml` / `*.yml` file in a directory (not recursive), sorted by name;
/// or a single file if the path is a file.
#[derive(Debug, Clone)]
pub struct DirSource {
    path: PathBuf,
}

impl DirSource {
    /// A source reading `path`.
    pub fn new(path: impl Into<PathBuf>) -> DirSource {
        DirSource { path: path.into() }
    }
}

fn read(path: &Path) -> Result<String, SourceError> {
    fs::read_to_string(path).map_err(|source| SourceError::Io {
        path: path.to_owned(),
        source,
    })
}

impl PolicySource for DirSource {
    fn files(&self) -> Result<Vec<(PathBuf, String)>, SourceError> {
        let io = |source| SourceError::Io {
            path: self.path.clone(),
            source,
        };
        if fs::metadata(&self.path).map_err(io)?.is_file() {
            return Ok(vec![(self.path.clone(), read(&self.path)?)]);
        }
        let mut paths = Vec::new();
        for entry in fs::read_dir(&self.path).map_err(io)? {
            let p = entry.map_err(io)?.path();
            let yaml = p.extension().is_some_and(|e| e == "yaml" || e == "yml");
            if yaml && p.is_file() {
                paths.push(p);
            }
        }
        if paths.is_empty() {
            return Err(SourceError::Empty(self.path.clone()));
        }
        paths.sort();
        paths.into_iter().map(|p| read(&p).map(|t| (p, t))).collect()
    }
}

/// Files held in memory (tests, API uploads).
#[derive(Debug, Clone, Default)]
pub struct MemorySource {
    files: Vec<(PathBuf, String)>,
}

impl MemorySource {
    /// An empty source.
    pub fn new() -> MemorySource {
        MemorySource::default()
    }

    /// Add a file (kept in insertion order).
    pub fn with(mut self, name: impl Into<PathBuf>, text: impl Into<String>) -> MemorySource {
        self.files.push((name.into(), text.into()));
        self
    }
}

impl PolicySource for MemorySource {
    fn files(&self) -> Result<Vec<(PathBuf, String)>, SourceError> {
        Ok(self.files.clone())
    }
}

/// The loaded texts, for rendering diagnostics with their source lines.
#[derive(Debug, Clone, Default)]
pub struct SourceMap {
    files: Vec<(String, String)>,
}

impl SourceMap {
    /// Record a file.
    pub fn add(&mut self, name: String, text: String) {
        self.files.push((name, text));
    }

    /// Line `line` (1-based) of `file`, without its newline.
    pub fn line(&self, file: &str, line: u32) -> Option<&str> {
        let (_, text) = self.files.iter().find(|(n, _)| n == file)?;
        text.lines().nth((line as usize).checked_sub(1)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_is_read_sorted_and_filtered() {
        let dir = std::env::temp_dir().join(format!("palisade-policy-source-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("b.yml"), "version: 1\n").unwrap();
        fs::write(dir.join("a.yaml"), "rules: {}\n").unwrap();
        fs::write(dir.join("notes.txt"), "ignored").unwrap();
        let files = DirSource::new(&dir).files().unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["a.yaml", "b.yml"]);
        let single = DirSource::new(dir.join("b.yml")).files().unwrap();
        assert_eq!(single.len(), 1);
        fs::remove_file(dir.join("a.yaml")).unwrap();
        fs::remove_file(dir.join("b.yml")).unwrap();
        assert!(matches!(DirSource::new(&dir).files(), Err(SourceError::Empty(_))));
        fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(DirSource::new(&dir).files(), Err(SourceError::Io { .. })));
    }

    #[test]
    fn memory_source_and_lines() {
        let files = MemorySource::new().with("x.yaml", "a\nb\n").files().unwrap();
        assert_eq!(files.len(), 1);
        let mut map = SourceMap::default();
        map.add("x.yaml".into(), "a\nb\n".into());
        assert_eq!(map.line("x.yaml", 2), Some("b"));
        assert_eq!(map.line("x.yaml", 0), None);
        assert_eq!(map.line("y.yaml", 1), None);
    }
}

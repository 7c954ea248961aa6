//! Where policy text comes from: a directory of YAML files, or memory.
//!
//! The loader only sees a [`PolicySource`], so tests feed files from memory and
//! the CLI reads a directory; both give the loader `(name, text)` pairs in a
//! stable order (sorted by name), which fixes the order of rules that several
//! files contribute to the same level.

use std::fs;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use crate::limits::MAX_FILE_BYTES;

/// Reading a policy source failed (the only I/O this crate does).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// A file or directory could not be read (a broken symlink or a
    /// symlink loop among them).
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
    /// A policy file that is not a regular file (after following symlinks).
    #[error("{path} is {what}, not a regular file")]
    NotRegularFile {
        /// The entry.
        path: PathBuf,
        /// What it is: "a directory", "a FIFO", …
        what: &'static str,
    },
    /// A policy file over [`MAX_FILE_BYTES`].
    #[error("{path} is {size} bytes, over the limit of {limit} bytes ({} MiB) for a policy file", limit >> 20)]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size (at least; when it grew while read, what was read).
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A policy file that is not UTF-8.
    #[error("{}:{line}:{column}: not valid UTF-8 (byte 0x{byte:02x})", path.display())]
    NotUtf8 {
        /// The file.
        path: PathBuf,
        /// 1-based line of the first byte that is not.
        line: u32,
        /// 1-based column (in characters) of that byte.
        column: u32,
        /// The byte.
        byte: u8,
    },
}

/// A provider of policy files.
pub trait PolicySource {
    /// The files, as (display name, contents), in load order.
    fn files(&self) -> Result<Vec<(PathBuf, String)>, SourceError>;
}

/// Every `*.yaml` / `*.yml` entry of a directory (not recursive), sorted by
/// name; or a single file if the path is one.
///
/// Every such entry must be a regular file, or a symlink to one (followed):
/// a broken symlink, a loop, a directory, a FIFO or a device named
/// `*.yaml` is an error naming it, never skipped, since its rules would
/// silently be missing. Emacs lock files (`.#NAME`, dangling symlinks that
/// exist while a file is being edited) are not policy files. A file is
/// opened without blocking (a FIFO swapped in after the type check cannot
/// hang the reader), refused by its size before it is read when over
/// [`MAX_FILE_BYTES`], and must be UTF-8 (the error says where it is not).
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

/// What a file type is, for errors.
fn describe(t: fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Read the policy file at `path`, which must be (or link to) a regular file.
fn read(path: &Path) -> Result<String, SourceError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| SourceError::Io {
        path: path.to_owned(),
        source,
    };
    let not_regular = |t: fs::FileType| SourceError::NotRegularFile {
        path: path.to_owned(),
        what: describe(t),
    };
    let too_large = |size| SourceError::TooLarge {
        path: path.to_owned(),
        size,
        limit: MAX_FILE_BYTES,
    };
    // The type first (following symlinks): a FIFO or a device is never opened.
    let meta = fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        return Err(not_regular(meta.file_type()));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(too_large(meta.len()));
    }
    // Non-blocking, and the type checked again on what was opened: the
    // entry may have been replaced in between.
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(not_regular(meta.file_type()));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(too_large(bytes.len() as u64));
    }
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let bytes = e.as_bytes();
        // Everything before `at` is UTF-8.
        let valid = std::str::from_utf8(&bytes[..at]).unwrap_or_default();
        let (line, column) = crate::chars::position(valid, at);
        SourceError::NotUtf8 {
            path: path.to_owned(),
            line,
            column,
            byte: bytes[at],
        }
    })
}

impl PolicySource for DirSource {
    fn files(&self) -> Result<Vec<(PathBuf, String)>, SourceError> {
        let io = |source| SourceError::Io {
            path: self.path.clone(),
            source,
        };
        let meta = fs::metadata(&self.path).map_err(io)?;
        if !meta.is_dir() {
            return Ok(vec![(self.path.clone(), read(&self.path)?)]);
        }
        let mut paths = Vec::new();
        for entry in fs::read_dir(&self.path).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name();
            let p = entry.path();
            let yaml = p.extension().is_some_and(|e| e == "yaml" || e == "yml");
            if yaml && !name.as_encoded_bytes().starts_with(b".#") {
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

    /// The text of `file`.
    pub fn text(&self, file: &str) -> Option<&str> {
        self.files.iter().find(|(n, _)| n == file).map(|(_, t)| t.as_str())
    }

    /// Line `line` (1-based) of `file`, without its newline.
    pub fn line(&self, file: &str, line: u32) -> Option<&str> {
        self.text(file)?.lines().nth((line as usize).checked_sub(1)?)
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

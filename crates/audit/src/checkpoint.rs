//! Signed checkpoints and the log's signing key.
//!
//! A checkpoint `{seq, hash, time, signature}` is an ed25519 signature over
//! the chain hash of record `seq`: it commits to every record up to `seq`, so
//! rewriting history (even with every hash recomputed) needs the private key.
//! Each segment has a sidecar `<segment>.ckpt` of fixed-size entries; its
//! first entry is the segment's anchor (the record before the segment: its
//! header's `first_seq - 1` and `prev_hash`), so a segment verifies on its own
//! once older segments are deleted by retention. Deletions by retention are
//! themselves signed, with a different domain tag, in `retention.ckpt`, so a
//! log that starts late is either explained by a signed retention entry or
//! reported.
//!
//! The private key (a hex ed25519 seed) lives in a file OUTSIDE the trail
//! directory (by default `<parent>/<trail>.key`, beside the directory), so
//! that whoever can write the trail cannot re-sign a rewritten history with
//! it. [`load_or_create_key`] refuses a key inside the trail (through
//! symlinks too), a key that group or others may access, and a legacy
//! `audit.key` left in the trail directory (it says how to move it: the
//! daemon does not adopt a key from a directory an attacker may write). The
//! public key is kept at `<dir>/audit.pub` for convenience; a verifier should
//! be given it from elsewhere (`--key`, or a published head): one read from
//! the trail directory only shows the trail is consistent with itself.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

use crate::error::{AuditError, IoContext};
use crate::segment::Hash;

/// Length of one checkpoint entry.
pub const CHECKPOINT_LEN: usize = field::SIGNATURE.end;

/// Field layout of a checkpoint entry.
mod field {
    use std::ops::Range;
    pub const SEQ: Range<usize> = 0..8;
    pub const HASH: Range<usize> = 8..40;
    pub const TIME_NS: Range<usize> = 40..48;
    pub const SIGNATURE: Range<usize> = 48..112;
}

/// What a signature is for: the tag is part of the signed message, so a
/// checkpoint cannot be passed off as a retention entry or the reverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A checkpoint of the chain.
    Checkpoint,
    /// The records up to `seq` were deleted by retention.
    Retention,
    /// A sealed segment's query index (the hash is the index body's).
    Index,
}

impl Purpose {
    fn tag(self) -> &'static [u8] {
        match self {
            Purpose::Checkpoint => b"palisade-audit checkpoint v1\0",
            Purpose::Retention => b"palisade-audit retention v1\0",
            Purpose::Index => b"palisade-audit index v1\0",
        }
    }
}

/// One signed checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// The record it covers (0: before the first record).
    pub seq: u64,
    /// That record's chain hash.
    pub hash: Hash,
    /// When it was made (Unix time, nanoseconds).
    pub time_ns: u64,
    /// ed25519 signature over the purpose tag, seq, hash and time.
    pub signature: [u8; 64],
}

impl Checkpoint {
    fn message(purpose: Purpose, seq: u64, hash: &Hash, time_ns: u64) -> Vec<u8> {
        let mut m = purpose.tag().to_vec();
        m.extend_from_slice(&seq.to_le_bytes());
        m.extend_from_slice(hash);
        m.extend_from_slice(&time_ns.to_le_bytes());
        m
    }

    /// Sign a checkpoint.
    pub fn sign(key: &SigningKey, purpose: Purpose, seq: u64, hash: Hash, time_ns: u64) -> Checkpoint {
        let signature = key.sign(&Self::message(purpose, seq, &hash, time_ns)).to_bytes();
        Checkpoint {
            seq,
            hash,
            time_ns,
            signature,
        }
    }

    /// Whether the signature is `key`'s for this content.
    pub fn verify(&self, key: &VerifyingKey, purpose: Purpose) -> bool {
        let sig = Signature::from_bytes(&self.signature);
        key.verify(&Self::message(purpose, self.seq, &self.hash, self.time_ns), &sig)
            .is_ok()
    }

    /// The entry's bytes.
    pub fn emit(&self) -> [u8; CHECKPOINT_LEN] {
        let mut b = [0u8; CHECKPOINT_LEN];
        b[field::SEQ].copy_from_slice(&self.seq.to_le_bytes());
        b[field::HASH].copy_from_slice(&self.hash);
        b[field::TIME_NS].copy_from_slice(&self.time_ns.to_le_bytes());
        b[field::SIGNATURE].copy_from_slice(&self.signature);
        b
    }

    /// Parse an entry; `None` when `b` is short.
    pub fn parse(b: &[u8]) -> Option<Checkpoint> {
        let b = b.get(..CHECKPOINT_LEN)?;
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&b[field::HASH]);
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&b[field::SIGNATURE]);
        Some(Checkpoint {
            seq: u64::from_le_bytes(b[field::SEQ].try_into().ok()?),
            hash,
            time_ns: u64::from_le_bytes(b[field::TIME_NS].try_into().ok()?),
            signature,
        })
    }
}

/// Call `f` with each whole entry of a checkpoint file and its byte offset,
/// reading it as a stream (a file of any size takes one small buffer); the
/// length of a torn tail (a trailing partial entry), if any. A missing file
/// has no entries.
pub fn for_each_checkpoint(path: &Path, mut f: impl FnMut(u64, Checkpoint)) -> Result<usize, AuditError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(AuditError::io(path, e)),
    };
    let mut r = std::io::BufReader::with_capacity(64 * CHECKPOINT_LEN, file);
    let mut b = [0u8; CHECKPOINT_LEN];
    let mut offset = 0u64;
    loop {
        let n = crate::segment::read_full(&mut r, &mut b).at(path)?;
        if n < CHECKPOINT_LEN {
            return Ok(n);
        }
        if let Some(c) = Checkpoint::parse(&b) {
            f(offset, c);
        }
        offset += CHECKPOINT_LEN as u64;
    }
}

/// The entries of a checkpoint file and the length of a torn tail (a
/// trailing partial entry), if any.
pub fn read_checkpoints(path: &Path) -> Result<(Vec<Checkpoint>, usize), AuditError> {
    let mut out = Vec::new();
    let torn = for_each_checkpoint(path, |_, c| out.push(c))?;
    Ok((out, torn))
}

/// Append an entry to a checkpoint file and make it durable.
pub fn append_checkpoint(path: &Path, c: &Checkpoint) -> Result<(), AuditError> {
    let mut f = OpenOptions::new().create(true).append(true).open(path).at(path)?;
    f.write_all(&c.emit()).at(path)?;
    f.sync_data().at(path)
}

/// The path of the retention file in `dir`.
pub fn retention_path(dir: &Path) -> PathBuf {
    dir.join("retention.ckpt")
}

/// Lowercase hex.
pub fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Parse exactly 32 bytes of hex (surrounding whitespace ignored).
pub(crate) fn from_hex32(s: &str) -> Option<[u8; 32]> {
    from_hex(s)
}

/// Parse exactly `N` bytes of hex (surrounding whitespace ignored).
pub(crate) fn from_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.trim();
    if s.len() != 2 * N || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        // `s` is ASCII of length 2N, so every 2-byte slice is in bounds and on a char boundary.
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Read a signing key (a hex ed25519 seed).
pub fn read_signing_key(path: &Path) -> Result<SigningKey, AuditError> {
    let text = std::fs::read_to_string(path).at(path)?;
    let seed = from_hex32(&text).ok_or_else(|| AuditError::Key {
        path: path.into(),
        reason: "expected 64 hex digits (an ed25519 seed)".into(),
    })?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Read a public key (hex).
pub fn read_verifying_key(path: &Path) -> Result<VerifyingKey, AuditError> {
    let text = std::fs::read_to_string(path).at(path)?;
    let bytes = from_hex32(&text).ok_or_else(|| AuditError::Key {
        path: path.into(),
        reason: "expected 64 hex digits (an ed25519 public key)".into(),
    })?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| AuditError::Key {
        path: path.into(),
        reason: format!("not a valid ed25519 public key: {e}"),
    })
}

/// Write `text` to a new file `path` with `mode`, durably.
fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), AuditError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .at(path)?;
    f.write_all(text.as_bytes()).at(path)?;
    f.sync_all().at(path)
}

/// The default key file of the trail in `dir`: `<dir>.key` beside the
/// directory (`/var/lib/palisade/audit` → `/var/lib/palisade/audit.key`).
pub fn default_key_file(dir: &Path) -> Result<PathBuf, AuditError> {
    let dir = std::path::absolute(dir).at(dir)?;
    match (dir.parent(), dir.file_name()) {
        (Some(parent), Some(name)) => {
            let mut name = name.to_os_string();
            name.push(".key");
            Ok(parent.join(name))
        }
        _ => Err(AuditError::Key {
            path: dir.clone(),
            reason: "the trail directory has no parent to keep its key beside it: configure a key file".into(),
        }),
    }
}

/// `path` with symlinks resolved as far as it exists (the rest cannot hold
/// symlinks yet), absolute.
fn resolve(path: &Path) -> std::io::Result<PathBuf> {
    let path = std::path::absolute(path)?;
    let mut existing = path.as_path();
    let mut rest = Vec::new();
    loop {
        match std::fs::canonicalize(existing) {
            Ok(mut p) => {
                for c in rest.iter().rev() {
                    p.push(c);
                }
                return Ok(p);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else {
                    return Err(e);
                };
                rest.push(name.to_os_string());
                existing = parent;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether `path` is `dir` or inside it, symlinks resolved.
pub fn is_inside(path: &Path, dir: &Path) -> Result<bool, AuditError> {
    let dir = resolve(dir).at(dir)?;
    Ok(resolve(path).at(path)?.starts_with(dir))
}

/// Refuse a key file group or others may access, or one that is not a regular file.
fn check_private(path: &Path) -> Result<(), AuditError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).at(path)?;
    if !meta.is_file() {
        return Err(AuditError::Key {
            path: path.into(),
            reason: "not a regular file".into(),
        });
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(AuditError::Key {
            path: path.into(),
            reason: format!(
                "mode {mode:o} lets group or others access the signing key: chmod 600 {}",
                path.display()
            ),
        });
    }
    Ok(())
}

/// The trail's signing key from `key_file`, created (mode 0600, its
/// directory 0700 if missing) when it does not exist. Refused: a key file in
/// the trail directory `dir` (symlinks followed), one group or others may
/// access, and a legacy `<dir>/audit.key`. `<dir>/audit.pub` is written if
/// missing and must match the key if present. `true` when the key was created.
pub fn load_or_create_key(dir: &Path, key_file: &Path) -> Result<(SigningKey, bool), AuditError> {
    if is_inside(key_file, dir)? {
        return Err(AuditError::Key {
            path: key_file.into(),
            reason: format!(
                "is inside the trail directory {}: whoever can write the trail could re-sign it; keep the key outside",
                dir.display()
            ),
        });
    }
    let legacy = dir.join("audit.key");
    if legacy.exists() {
        let reason = if key_file.exists() {
            format!(
                "a signing key must not live in the trail directory, and {} exists too: keep one \
                 (`rm {}` if they hold the same key, else decide which signed this trail)",
                key_file.display(),
                legacy.display()
            )
        } else {
            format!(
                "a signing key must not live in the trail directory, where whoever can write the trail can re-sign it: \
                 move it out with `mv {} {}` (if others could read {}, start a new trail with a new key instead)",
                legacy.display(),
                key_file.display(),
                dir.display()
            )
        };
        return Err(AuditError::Key { path: legacy, reason });
    }
    let pub_path = dir.join("audit.pub");
    let (key, created) = if key_file.exists() {
        check_private(key_file)?;
        (read_signing_key(key_file)?, false)
    } else {
        let parent = key_file.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(parent) = parent
            && !parent.exists()
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .at(parent)?;
        }
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| AuditError::Key {
            path: key_file.into(),
            reason: format!("no randomness for a new key: {e}"),
        })?;
        write_new(key_file, &format!("{}\n", to_hex(&seed)), 0o600)?;
        sync_dir(parent.unwrap_or(Path::new(".")))?;
        (SigningKey::from_bytes(&seed), true)
    };
    let public = key.verifying_key();
    if pub_path.exists() {
        let stored = read_verifying_key(&pub_path)?;
        if stored != public {
            return Err(AuditError::Key {
                path: pub_path,
                reason: format!("does not match the signing key {}", key_file.display()),
            });
        }
    } else {
        write_new(&pub_path, &format!("{}\n", to_hex(public.as_bytes())), 0o644)?;
        sync_dir(dir)?;
    }
    Ok((key, created))
}

/// fsync a directory, so that entries created or removed in it are durable.
pub fn sync_dir(dir: &Path) -> Result<(), AuditError> {
    File::open(dir).and_then(|d| d.sync_all()).at(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_purpose_separation() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let c = Checkpoint::sign(&key, Purpose::Checkpoint, 9, [1; 32], 77);
        let vk = key.verifying_key();
        assert!(c.verify(&vk, Purpose::Checkpoint));
        assert!(!c.verify(&vk, Purpose::Retention));
        let back = Checkpoint::parse(&c.emit()).unwrap();
        assert_eq!(back, c);
        let mut bad = c;
        bad.seq = 10;
        assert!(!bad.verify(&vk, Purpose::Checkpoint));
        let other = SigningKey::from_bytes(&[4; 32]).verifying_key();
        assert!(!c.verify(&other, Purpose::Checkpoint));
    }

    #[test]
    fn hex_parsing() {
        assert_eq!(from_hex32(&to_hex(&[0xab; 32])), Some([0xab; 32]));
        assert_eq!(from_hex32("zz"), None);
        assert_eq!(from_hex32(&"é".repeat(32)), None);
    }
}
